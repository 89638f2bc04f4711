"""The shapes of OpenAI's Responses API: a ``response`` object and its stream of named events.

A caption is one output item, an assistant ``message`` whose one ``output_text`` part is the
caption (several images: their captions a blank line apart). A caption cut off by
``max_output_tokens`` makes the response ``incomplete`` with ``incomplete_details.reason``
``max_output_tokens``, as OpenAI reports it; otherwise it is ``completed``.

The stream (:class:`ResponseEvents`) sends what OpenAI sends for a text answer, each event with
its ``type`` and a ``sequence_number`` counting from 0: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` per piece, then ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` and ``response.completed`` (or
``response.incomplete``); a failure after the stream began ends it with ``response.failed``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from vision_server.api.openai_replies import Completion
from vision_server.captioner import Caption

Event = dict[str, Any]


class ResponseObject:
    """One answer of ``POST /v1/responses``: its ids and time, the request settings it echoes
    (``echo``: instructions, max_output_tokens, temperature, top_p, metadata, …), and the
    caption once there is one."""

    def __init__(self, model: str, echo: dict[str, Any]) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.echo = echo

    def body(
        self, captions: list[Caption] | None = None, *, failed: dict[str, Any] | None = None, sent: str = ""
    ) -> dict[str, Any]:
        """The response: in progress (no ``captions``), finished, or ``failed`` with an OpenAI
        error object after ``sent`` text went out."""
        if failed is not None:
            output = [self.message(sent, "incomplete")] if sent else []
            error = {"code": failed.get("code") or "server_error", "message": failed.get("message", "")}
            return self._shape("failed", output, error=error)
        if captions is None:
            return self._shape("in_progress", [])
        answer = Completion.of(self.model, captions)
        truncated = answer.finish_reason == "length"
        status = "incomplete" if truncated else "completed"
        usage = {
            "input_tokens": answer.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": answer.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }
        return self._shape(
            status,
            [self.message(answer.content, status)],
            usage=usage,
            incomplete={"reason": "max_output_tokens"} if truncated else None,
            completed_at=None if truncated else int(time.time()),
        )

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        """The output item: an assistant message with the caption (no part yet for ``None``)."""
        content = [] if text is None else [output_text(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _shape(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        incomplete: dict[str, Any] | None = None,
        completed_at: int | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": completed_at,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,  # nothing is kept, whatever the request's store said
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "truncation": "disabled",
            "usage": usage,
            **self.echo,
        }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseEvents:
    """A streamed response as named events with sequence numbers
    (:class:`vision_server.api.openai_stream.StreamShape`)."""

    named = True
    done_marker = False  # OpenAI ends a Responses stream with response.completed, no [DONE]

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.sequence = 0
        self.sent = ""

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _at(self) -> dict[str, Any]:
        """Where the caption's text lives: the first part of the first output item."""
        return {"item_id": self.response.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[Event]:
        body = self.response.body()
        return [
            self._event("response.created", response=body),
            self._event("response.in_progress", response=body),
            self._event(
                "response.output_item.added", output_index=0, item=self.response.message(None, "in_progress")
            ),
            self._event("response.content_part.added", **self._at(), part=output_text("")),
        ]

    def delta(self, text: str) -> list[Event]:
        self.sent += text
        return [self._event("response.output_text.delta", **self._at(), delta=text, logprobs=[])]

    def closing(self, captions: list[Caption]) -> list[Event]:
        body = self.response.body(captions)
        item = body["output"][0]
        text = item["content"][0]["text"]
        return [
            self._event("response.output_text.done", **self._at(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._at(), part=output_text(text)),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event(f"response.{body['status']}", response=body),
        ]

    def failure(self, error: dict[str, Any]) -> list[Event]:
        return [self._event("response.failed", response=self.response.body(failed=error, sent=self.sent))]
