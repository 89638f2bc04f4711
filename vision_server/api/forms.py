"""Reading ``multipart/form-data`` uploads part by part, within the request body limit.

aiohttp's ``client_max_size`` guards ``request.read()`` but not a streamed multipart body, so the
limit is counted here: a body over ``--max-request-bytes`` is a 413, never a 500 or a server
holding gigabytes. What counts is every byte of the body the server has received (the stream's
``total_bytes``), not just the parts' contents: a chunked body of many empty parts with long
names is all headers, and counting only the contents let one of those grow past any limit, each
name kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from vision_server.api.bodies import within_body_timeout
from vision_server.api.encodings import body_bytes, decoded_stream
from vision_server.api.state import SETTINGS
from vision_server.errors import BadRequest, PayloadTooLarge

CHUNK = 64 * 1024
MAX_TEXT_FIELD = 64 * 1024
# Parts past the files a request may hold (--max-images-per-request) and this many text fields
# are refused: aiohttp reads a part in about 0.1 ms of event-loop time, so 19 MB of 400,000
# empty parts took 53 s and stalled /health for seconds at a time. A form sends a dozen fields.
MAX_TEXT_PARTS = 64
MAX_FORM_FIELDS = 1000  # fields of a urlencoded form (aiohttp's own limit for request.post())


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the field it came in, its client-side name, and its bytes."""

    field: str
    filename: str
    data: bytes


@dataclass
class Form:
    files: list[Upload] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)  # file fields with another name


async def read_form(request: web.Request, file_fields: tuple[str, ...], limit: int) -> Form:
    """Files sent in ``file_fields`` and every text field; 400 for a malformed body, 413 over ``limit``,
    408 when it takes longer than ``--body-timeout`` to arrive."""
    return await within_body_timeout(request, _read_form(request, file_fields, limit))


async def _read_form(request: web.Request, file_fields: tuple[str, ...], limit: int) -> Form:
    if request.content_type == "application/x-www-form-urlencoded":  # a form without files
        return Form(fields=url_encoded_fields(request, await body_bytes(request, limit)))
    if request.content_type not in ("multipart/form-data", "multipart/mixed"):
        raise BadRequest(
            f"Send multipart/form-data (curl -F image=@photo.jpg), not {request.content_type or 'no body'}."
        )
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    form = Form()
    total = parts = 0
    max_parts = request.app[SETTINGS].max_images_per_request + MAX_TEXT_PARTS
    content = await decoded_stream(request, limit)
    try:
        reader = MultipartReader(request.headers, content)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("Nested multipart bodies are not supported.")
            parts += 1
            if parts > max_parts:
                raise too_many_parts(request, max_parts)
            if content.total_bytes > limit:
                raise too_large(limit)
            name = part.name or ""
            is_file = name in file_fields
            part_limit = limit if is_file or part.filename is not None else MAX_TEXT_FIELD
            data = await read_part(
                part, budget=limit - total, part_limit=part_limit, body_limit=limit, content=content
            )
            total += len(data)
            if is_file:
                form.files.append(Upload(name, part.filename or f"{name}{len(form.files) + 1}", data))
            elif part.filename is None:
                form.fields[name] = data.decode("utf-8", errors="replace")
            else:
                form.ignored_files.append(name)
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # aiohttp: a malformed body
        raise BadRequest(f"Malformed multipart body: {exc}") from None
    return form


def url_encoded_fields(request: web.Request, body: bytes) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (its last value of each name),
    read here rather than by ``request.post()``, which would read the body undecoded."""
    charset = request.charset or "utf-8"
    try:
        text = body.rstrip().decode(charset)
        pairs = parse_qsl(text, keep_blank_values=True, encoding=charset, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, LookupError) as exc:  # not its charset, or an unknown charset
        raise BadRequest(f"Malformed form body: {exc}; send multipart/form-data for files.") from None
    except ValueError:  # parse_qsl's field limit
        raise BadRequest(
            f"The form has more than {MAX_FORM_FIELDS} form fields: send the image as multipart/form-data "
            "(curl -F image=@photo.jpg) with only the fields the API reads."
        ) from None
    return dict(pairs)


async def read_part(
    part: BodyPartReader, *, budget: int, part_limit: int, body_limit: int, content: StreamReader
) -> bytes:
    """The part's bytes, raising as soon as the body's remaining budget or the part's limit is passed."""
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data.extend(chunk)
        if len(data) > budget or content.total_bytes > body_limit:
            raise too_large(body_limit)
        if len(data) > part_limit:
            raise BadRequest(f"Form field {part.name!r} is longer than {part_limit} bytes.")
    return bytes(data)


def too_many_parts(request: web.Request, max_parts: int) -> BadRequest:
    files = request.app[SETTINGS].max_images_per_request
    return BadRequest(
        f"The form has more than {max_parts} parts; at most {files} files "
        f"(--max-images-per-request) and {MAX_TEXT_PARTS} other fields are read. Send the other "
        "images in further requests."
    )


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body too large: the limit is {limit} bytes. Send a smaller image.")
