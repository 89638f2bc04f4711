"""What an OpenAI-family request gives a captioner: inline images and the user's words.

Chat completions (``messages`` with ``image_url`` parts) and the Responses API (``input`` items
with ``input_image`` parts) spell them differently; each route turns its request into a list of
user messages, each a list of :data:`Part`, and both are read the same way here:

- the images are those of the **last user message that has any**; the text of that message
  and of later user messages picks the task (earlier turns asked about earlier images);
- an image is a ``data:`` URL or bare base64. The server fetches nothing, so a URL with a
  scheme (``https://``) is a 400 that says to send the image inline;
- more images than ``--max-images-per-request`` is a 400.
"""

from __future__ import annotations

import re

from vision_server.api.errors import InvalidParameter
from vision_server.api.generation import shown
from vision_server.settings import Settings

# ("text" | "image", the text or the image's data URL, the request field it came from)
Part = tuple[str, str, str]

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def inline_image(param: str, url: object) -> str:
    """The data URL or bare base64 of an image field ``param``; a fetchable URL is a 400."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidParameter(
            param, f"{param} must be a data URL string (data:image/png;base64,...), not {shown(url)}."
        )
    url = url.strip()
    if _URL_SCHEME.match(url):
        raise InvalidParameter(
            param,
            f"Image URLs are not fetched by this server ({url[:60]}); send the image inline as a "
            "data URL: data:image/png;base64,...",
        )
    return url


def images_and_text(users: list[list[Part]], param: str, how: str) -> tuple[list[tuple[str, str]], str]:
    """Images of the last user message that has any (each with the field that holds it), and the
    user text from there on. No image at all is a 400 on ``param`` that says ``how`` to add one."""
    with_images = [index for index, parts in enumerate(users) if any(part[0] == "image" for part in parts)]
    if not with_images:
        raise InvalidParameter(param, f"No image in the request: {how}")
    start = with_images[-1]
    images = [(value, where) for kind, value, where in users[start] if kind == "image"]
    texts = [value for parts in users[start:] for kind, value, _ in parts if kind == "text"]
    return images, "\n".join(texts)


def check_image_count(count: int, settings: Settings, param: str) -> None:
    if count > settings.max_images_per_request:
        raise InvalidParameter(
            param,
            f"The message has {count} images; the limit is {settings.max_images_per_request} "
            "per request (--max-images-per-request). Send the others in further requests.",
        )
