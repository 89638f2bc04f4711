"""Reading request bodies with clear errors, shared by every API family."""

from __future__ import annotations

import json
import sys
from typing import Any

from aiohttp import web

from vision_server.api.errors import MissingField
from vision_server.errors import BadRequest


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 with the reason when it is not one (413 when too big)."""
    raw = await request.read()
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("The request body nests JSON arrays or objects too deeply.") from None
    except ValueError:  # what is left is Python's guard against quadratic int parsing
        digits = sys.get_int_max_str_digits()
        raise BadRequest(f"The request body has a number with more than {digits} digits.") from None
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def require_str(body: dict[str, Any], name: str) -> str:
    if name not in body or body[name] is None:
        raise MissingField(name)
    value = body[name]
    if not isinstance(value, str):
        raise BadRequest(f"Field {name!r} must be a string, not {type(value).__name__}.")
    return value
