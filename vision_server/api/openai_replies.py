"""The shapes OpenAI clients read: a chat completion, its stream chunks, and an error body."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from vision_server.captioner import Caption
from vision_server.errors import VisionServerError


def error_type(status: int, code: str = "") -> str:
    """OpenAI's error ``type`` for a status (SDKs pick their exception class by status)."""
    if code == "model_not_found":  # OpenAI's own 404 for an unknown model says this
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"


def error_body(error: VisionServerError) -> dict[str, Any]:
    code = "invalid_api_key" if error.status == 401 else error.code
    return {
        "error": {
            "message": error.message,
            "type": error_type(error.status, code),
            "param": error.param,
            "code": code,
        }
    }


def joined_text(captions: list[Caption]) -> str:
    """The one answer to a request with several images: their captions, a blank line apart."""
    return "\n\n".join(caption.text for caption in captions)


@dataclass(frozen=True)
class Completion:
    """The caption(s) of one request, as the pieces every reply shape needs."""

    id: str
    created: int
    model: str
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def started(cls, model: str) -> Completion:
        """An empty completion with its id and time: what a stream's early chunks carry."""
        return cls(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, "", "stop", 0, 0)

    @classmethod
    def of(cls, model: str, captions: list[Caption], *, like: Completion | None = None) -> Completion:
        """The completion of ``captions`` (with the id and time of ``like``, for a stream)."""
        head = like or cls.started(model)
        return cls(
            id=head.id,
            created=head.created,
            model=model,
            content=joined_text(captions),
            finish_reason="length" if any(c.finish_reason == "length" for c in captions) else "stop",
            prompt_tokens=sum(caption.prompt_tokens for caption in captions),
            completion_tokens=sum(caption.completion_tokens for caption in captions),
        )

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def body(self) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self.content},
            "logprobs": None,
            "finish_reason": self.finish_reason,
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def opening(self) -> dict[str, Any]:
        """The first chunk of a stream: the assistant's role."""
        return self.chunk({"role": "assistant", "content": ""})

    def closing(self, include_usage: bool) -> list[dict[str, Any]]:
        """The last chunks: the finish reason, then the usage when the client asked for it."""
        chunks = [self.chunk({}, self.finish_reason)]
        if include_usage:
            chunks.append({**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage()})
        return chunks

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


class ChatChunks:
    """A streamed chat completion: a role chunk, content chunks, the finish (and usage) chunk,
    then ``data: [DONE]`` (:class:`vision_server.api.openai_stream.StreamShape`)."""

    named = False
    done_marker = True

    def __init__(self, model: str, include_usage: bool) -> None:
        self.head = Completion.started(model)
        self.include_usage = include_usage

    def opening(self) -> list[dict[str, Any]]:
        return [self.head.opening()]

    def delta(self, text: str) -> list[dict[str, Any]]:
        return [self.head.chunk({"content": text})]

    def closing(self, captions: list[Caption]) -> list[dict[str, Any]]:
        return Completion.of(self.head.model, captions, like=self.head).closing(self.include_usage)

    def failure(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"error": error}]
