"""Per-request generation parameters (OpenAI body fields, form fields) → validated options.

Requests that override nothing get exactly the server's default options, so they batch with
every other family's default requests (the engine batches only equal options).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import TYPE_CHECKING

from vision_server.api.errors import InvalidParameter
from vision_server.captioner import GenerationOptions
from vision_server.model_specs import is_path_source
from vision_server.settings import Settings

if TYPE_CHECKING:
    from vision_server.engine.lifecycle import ModelCard

MAX_BEAMS = 8  # beams multiply memory per image; past this they only cost
MAX_TEMPERATURE = 2.0
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 40


def shown(value: object) -> str:
    """A field's value as quoted in an error: short, and safe for a 400-digit or deeply nested one."""
    return _SHORT.repr(value)


def as_number(name: str, value: object, *, low: float, high: float, low_open: bool = False) -> float | None:
    """A number from JSON or a form field within [low, high] (or (low, high]); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidParameter(name, f"{name!r} must be a number, not {type(value).__name__}.")
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameter(name, f"{name!r} must be a number, not {shown(value)}.") from None
    except OverflowError:  # an int too big for a float, such as a 400-digit JSON number
        number = math.inf
    too_low = number <= low if low_open else number < low
    if not math.isfinite(number) or too_low or number > high:
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        limits = f"{bound} and at most {high:g}" if high < 1e6 else bound
        raise InvalidParameter(name, f"{name!r} must be {limits}, not {shown(value)}.")
    return number


def as_int(name: str, value: object, *, low: int, high: int) -> int | None:
    number = as_number(name, value, low=low, high=high)
    if number is None:
        return None
    if not number.is_integer():
        raise InvalidParameter(name, f"{name!r} must be a whole number, not {shown(value)}.")
    return int(number)


def as_bool(name: str, value: object) -> bool | None:
    """JSON true/false, or a form's true/false/1/0/yes/no/on/off; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
        return value.strip().lower() in _TRUE
    raise InvalidParameter(name, f"{name!r} must be true or false, not {shown(value)}.")


# A JSON body (the OpenAI route) says what it means with its types: "10" or "yes" is a client bug
# that OpenAI answers with a 400 naming the field, not a value to parse as a form field's text.
# null stays "not given" (the SDKs send it for an explicit None).


def json_number(name: str, value: object, *, low: float, high: float, low_open: bool = False) -> float | None:
    """:func:`as_number` for a JSON field: a string is the wrong type, whatever it holds."""
    if isinstance(value, str):
        raise InvalidParameter(name, f"{name!r} must be a number, not a string ({shown(value)}).")
    return as_number(name, value, low=low, high=high, low_open=low_open)


def json_int(name: str, value: object, *, low: int, high: int) -> int | None:
    """:func:`as_int` for a JSON field: a string is the wrong type, whatever it holds."""
    if isinstance(value, str):
        raise InvalidParameter(name, f"{name!r} must be an integer, not a string ({shown(value)}).")
    return as_int(name, value, low=low, high=high)


def json_bool(name: str, value: object) -> bool | None:
    """A JSON ``true``/``false`` (None when null or absent); anything else is a 400 naming ``name``."""
    if value is None or isinstance(value, bool):
        return value
    raise InvalidParameter(name, f"{name!r} must be true or false, not {shown(value)}.")


def generation_options(
    settings: Settings,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    num_beams: int | None = None,
    do_sample: bool | None = None,
    with_confidence: bool = False,
    model: ModelCard | None = None,
    length_name: str = "max_new_tokens",
    caption_tokens: bool = False,
) -> GenerationOptions:
    """Options for one request, from already validated values.

    Built from :meth:`Settings.generation_defaults`, the one place defaults are made: a request
    that overrides nothing gets exactly those options, so it batches with every family's
    default requests. ``temperature`` > 0 samples (with one beam unless beams are asked for)
    unless ``do_sample`` is false; ``top_p`` only matters when sampling. ``max_new_tokens`` is
    capped by the server's ``--max-new-tokens``; more than ``model`` can generate is a 400 (its
    field named ``length_name``). The server's own default is never refused: the captioner
    stops it at the model's limit.

    ``caption_tokens`` says ``max_new_tokens`` counts the caption's own tokens, as OpenAI's
    ``max_tokens`` counts completion tokens: the captioner adds the tokens its model forces
    (:meth:`GenerationOptions.for_generate`), still within the server's cap. Without it the
    limit counts as ``generate`` does (the multipart fields, named after its arguments)."""
    defaults = settings.generation_defaults()
    limit = defaults.max_new_tokens
    tokens = limit if max_new_tokens is None else min(max_new_tokens, limit)
    if max_new_tokens is not None and model is not None:
        check_model_limit(length_name, max_new_tokens, tokens, model)
    if caption_tokens and tokens < limit:
        # generate's count stays the cap; the captioner brings it down to these plus its forced ones
        asked = dataclasses.replace(defaults, caption_tokens=tokens, with_confidence=with_confidence)
    else:
        asked = dataclasses.replace(
            defaults,
            max_new_tokens=tokens,
            min_new_tokens=min(defaults.min_new_tokens, tokens),
            with_confidence=with_confidence,
        )
    if not (temperature or 0) > 0 or do_sample is False:
        return asked if num_beams is None else dataclasses.replace(asked, num_beams=num_beams)
    return dataclasses.replace(
        asked,
        num_beams=1 if num_beams is None else num_beams,
        temperature=float(temperature or 0),
        top_p=defaults.top_p if top_p is None else top_p,
    )


def check_model_limit(name: str, asked: int, tokens: int, model: ModelCard) -> None:
    """400 when a request asks ``model`` for more tokens than its text decoder can hold.

    ``tokens`` is the ask after the server's cap: a client asking for 4096 from a server whose
    --max-new-tokens (1024) the model can reach gets 1024 as before, not an error.
    """
    limit = model.max_new_tokens
    if limit is None or tokens <= limit:
        return
    named = model.name or model.model_id
    # the hub id helps; a local directory's path is the server's business (see folder_names)
    shown = model.source and model.source != named and not is_path_source(model.source)
    source = f" ({model.source})" if shown else ""
    raise InvalidParameter(
        name,
        f"{name!r} asks for {asked} tokens; model {named!r}{source} generates at most {limit} "
        "(its text decoder's positions, prompt tokens included). Ask for at most "
        f"{limit}, or leave {name!r} out.",
    )
