"""Fuzz: generated requests of every API family thrown at a real server; nothing may answer 5xx.

Hypothesis generates the requests: arbitrary JSON (huge integers, deep nesting, NaN, odd
strings) as bodies of the JSON routes, OpenAI chat bodies with every kind of message and part
shape and generation field, native and Extras bodies, multipart forms (right and wrong field
names, files that are or are not images, broken framing), and header values (``Authorization``
with arbitrary bytes, proxy headers, CORS, request ids, content types) on every route, admin
routes included. Each request is written to the socket by hand, so bytes no HTTP library would
send get sent too.

The server runs with ``--api-key`` (the fuzzer sends it most of the time, so requests get past
authentication) and an ``--admin-key`` the fuzzer never learns (admin routes are exercised
without ever unloading the model). Checks, printed as a table and one JSON line:

- no request is answered 5xx (the first one stops the run, shrunk to a minimal example);
- every request gets an answer;
- afterwards the server still captions a good image and ``/health`` is 200;
- the server log has no traceback.

The exit status is 0 only when every check passes.

    python benchmarks/fuzz.py                              # 5,000 examples, tiny model
    python benchmarks/fuzz.py --examples 20000 --seed 7 --json-out fuzz.json

``tests/system/test_fuzz_requests.py`` runs the same property with a few hundred examples.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from PIL import Image

API_KEY = "fuzz-api-key"
ADMIN_KEY = "fuzz-admin-key-that-the-fuzzer-never-sends"
_LISTENING = re.compile(r"listening on (https?://[\w.:\[\]-]+)")

JSON_ROUTES = ("/process_image", "/v1/chat/completions", "/v1/responses", "/api/caption")
FORM_ROUTES = ("/caption", "/detailed_caption", "/batch_caption")
OTHER_ROUTES = (
    ("GET", "/prompts"),
    ("GET", "/model"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/x"),
    ("GET", "/api/modules"),
    ("GET", "/tasks"),
    ("GET", "/model_info"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/v1/status"),
    ("GET", "/metrics"),
    ("POST", "/v1/model/load"),
    ("POST", "/v1/model/unload"),
    ("GET", "/no/such/route"),
    ("DELETE", "/process_image"),
)
TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<GENERATE_TAGS>", "<ANALYZE>", "<OD>")


def png(size: tuple[int, int] = (24, 20), color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


GOOD_PNG = png()
GOOD_B64 = base64.b64encode(GOOD_PNG).decode()


# --- JSON with values no encoder writes ---------------------------------------------------------


@dataclass(frozen=True)
class RawJson:
    """JSON text inserted as written: a 5,000-digit number, 3,000 nested arrays, ``1e400``."""

    text: str


def to_json(value: Any) -> str:
    """Like ``json.dumps``, but writes :class:`RawJson` verbatim and ints of any length."""
    if isinstance(value, RawJson):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return json.dumps(value)


def _digits(count: int, sign: str = "") -> RawJson:
    return RawJson(sign + "9" * count)


odd_numbers = st.one_of(
    st.builds(_digits, st.integers(300, 5000), st.sampled_from(["", "-"])),
    st.sampled_from(["1e400", "-1e400", "1e-400", "-0", "0.0", "NaN", "Infinity", "1E+999999"]).map(RawJson),
    st.integers(3000, 6000).map(lambda depth: RawJson("[" * depth + "]" * depth)),
    st.integers(-(2**70), 2**70),
)
image_strings = st.one_of(
    st.just(GOOD_B64),
    st.just(f"data:image/png;base64,{GOOD_B64}"),
    st.just(f"  data:image/png;base64,{GOOD_B64[:40]}\n{GOOD_B64[40:]}  "),
    st.sampled_from(
        ["", "data:", "data:image/png;base64,", "http://example.com/a.png", "file:///etc/passwd"]
    ),
    st.binary(max_size=200).map(lambda data: base64.b64encode(data).decode()),
    st.text(max_size=60),
)
prompts = st.one_of(
    st.sampled_from(TASKS), st.sampled_from(["caption", "booru tags", "<caption>", "<>"]), st.text()
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=40),
    odd_numbers,
    image_strings,
)
json_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
numberish = st.one_of(odd_numbers, st.integers(-5, 100), st.floats(-3, 3), json_values)

part = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["text", "image_url", "input_image", "audio"]), json_values)},
    optional={
        "text": st.one_of(prompts, json_values),
        "image_url": st.one_of(
            image_strings,
            st.fixed_dictionaries(
                {"url": st.one_of(image_strings, json_values)}, optional={"detail": st.text(max_size=8)}
            ),
            json_values,
        ),
    },
)
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), json_values)},
    optional={"content": st.one_of(prompts, st.lists(part, max_size=4), json_values)},
)
openai_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=4), json_values)},
    optional={
        "model": st.one_of(st.just("florence"), json_values),
        "max_tokens": numberish,
        "max_completion_tokens": numberish,
        "temperature": numberish,
        "top_p": numberish,
        "n": numberish,
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": json_values}), json_values),
    },
)
input_part = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["input_text", "input_image", "input_file"]), json_values)},
    optional={
        "text": st.one_of(prompts, json_values),
        "image_url": st.one_of(image_strings, json_values),
        "file_id": json_values,
    },
)
input_item = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "developer", "assistant"]), json_values)},
    optional={
        "type": st.one_of(st.sampled_from(["message", "function_call_output"]), json_values),
        "content": st.one_of(prompts, st.lists(input_part, max_size=4), json_values),
    },
)
responses_bodies = st.fixed_dictionaries(
    {"input": st.one_of(st.lists(input_item, max_size=4), prompts, json_values)},
    optional={
        "model": st.one_of(st.just("florence"), json_values),
        "instructions": st.one_of(st.text(max_size=40), json_values),
        "max_output_tokens": numberish,
        "temperature": numberish,
        "top_p": numberish,
        "top_logprobs": numberish,
        "stream": st.one_of(st.booleans(), json_values),
        "store": st.one_of(st.booleans(), json_values),
        "text": st.one_of(st.fixed_dictionaries({"format": json_values}), json_values),
        "tools": json_values,
        "tool_choice": json_values,
        "include": json_values,
        "previous_response_id": json_values,
    },
)
image_bodies = st.fixed_dictionaries(
    {}, optional={"image": st.one_of(image_strings, json_values), "prompt": st.one_of(prompts, json_values)}
)


@dataclass
class Request:
    """One HTTP request, as bytes on the wire (printed by Hypothesis when it fails)."""

    method: str
    path: str
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    body: bytes = b""

    def wire(self) -> bytes:
        # localhost: a server bound to loopback refuses other names (DNS rebinding), which would
        # turn almost every generated request into the same 403
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"Host: localhost", b"Connection: close"]
        lines += [name.encode() + b": " + value for name, value in self.headers]
        if self.body or self.method == "POST":
            lines.append(f"Content-Length: {len(self.body)}".encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


header_bytes = st.binary(max_size=80).map(lambda value: value.replace(b"\r", b"").replace(b"\n", b""))
authorization = st.one_of(
    st.just(f"Bearer {API_KEY}".encode()),
    st.just(f"Bearer {API_KEY}".encode()),  # mostly the right key, so requests reach the handlers
    st.just(f"Bearer {API_KEY}".encode()),
    st.builds(lambda junk: b"Bearer " + junk, header_bytes),
    header_bytes,
)
extra_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "X-Request-ID",
                "Forwarded",
                "X-Forwarded-For",
                "X-Real-IP",
                "Origin",
                "Accept",
                "Accept-Encoding",
                "Bypass-Tunnel-Reminder",
                "Access-Control-Request-Method",
                "Authorization",
            ]
        ),
        header_bytes,
    ),
    max_size=3,
)


@st.composite
def json_requests(draw: st.DrawFn) -> Request:
    path = draw(st.sampled_from(JSON_ROUTES))
    if path == "/v1/chat/completions":
        value = draw(st.one_of(openai_bodies, openai_bodies, json_values))
    elif path == "/v1/responses":
        value = draw(st.one_of(responses_bodies, responses_bodies, json_values))
    else:
        value = draw(st.one_of(image_bodies, image_bodies, json_values))
    body = to_json(value).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):  # now and then the body is cut short or has a stray byte
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=3))
    content_type = draw(
        st.sampled_from([b"application/json", b"text/plain", b"application/json; charset=latin-1"])
    )
    headers = [("Authorization", draw(authorization)), ("Content-Type", content_type), *draw(extra_headers)]
    return Request("POST", path, headers, body)


form_names = st.one_of(
    st.sampled_from(
        [
            "image",
            "file",
            "images",
            "files",
            "task",
            "prompt",
            "max_length",
            "max_new_tokens",
            "temperature",
            "top_p",
            "num_beams",
            "do_sample",
            "batch_size",
        ]
    ),
    st.text(max_size=10),
)
form_values = st.one_of(
    st.just(GOOD_PNG),
    st.binary(max_size=300),
    st.sampled_from([b"", b"0", b"-1", b"1e400", b"9" * 400, b"nan", b"true", b"<CAPTION>", b"tags"]),
    st.text(max_size=40).map(lambda text: text.encode("utf-8", "surrogatepass")),
)


@st.composite
def form_requests(draw: st.DrawFn) -> Request:
    boundary = "fuzzBoundary7MA4YWxk"
    chunks = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(form_names).replace('"', "").replace("\r", "").replace("\n", "")
        disposition = f'Content-Disposition: form-data; name="{name}"'
        filename = draw(st.one_of(st.none(), st.text(max_size=20)))
        if filename is not None:
            disposition += f'; filename="{filename.replace(chr(34), "")}"'
        head = disposition.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")
        content_type = draw(st.sampled_from([None, b"image/png", b"application/octet-stream", b"text/plain"]))
        if content_type is not None:
            head += b"\r\nContent-Type: " + content_type
        chunks.append(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + draw(form_values) + b"\r\n")
    body = b"".join(chunks) + b"--" + boundary.encode() + b"--\r\n"
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    content_type = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={boundary}".encode(),
                b"multipart/form-data",
                b"multipart/form-data; boundary=",
                b"application/x-www-form-urlencoded",
                b"application/json",
            ]
        )
    )
    headers = [("Authorization", draw(authorization)), ("Content-Type", content_type), *draw(extra_headers)]
    return Request("POST", draw(st.sampled_from(FORM_ROUTES)), headers, body)


@st.composite
def other_requests(draw: st.DrawFn) -> Request:
    """Every other route, and preflights, with odd header values and odd bytes in the query."""
    method, path = draw(st.sampled_from(OTHER_ROUTES))
    if draw(st.booleans()):
        method = "OPTIONS"
    query = draw(st.text(alphabet="abc=&%?;0123456789", max_size=12))
    headers = [("Authorization", draw(authorization)), *draw(extra_headers)]
    return Request(method, path + ("?" + query if query else ""), headers)


requests = st.one_of(json_requests(), json_requests(), form_requests(), other_requests())


# --- sending --------------------------------------------------------------------------------------


def send(base_url: str, request: Request, timeout: float = 120.0) -> int:
    """The status of the reply; raises when the server closes the connection without one."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request.wire())  # no half-close: the server would take it for a hang-up
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    first = reply.split(b"\r\n", 1)[0]
    if not first.startswith(b"HTTP/1."):
        raise AssertionError(f"no HTTP answer (got {reply[:80]!r})")
    return int(first.split(b" ", 2)[1])


def still_serves(base_url: str) -> bool:
    """``/health`` is 200 and a good image gets a caption."""
    health = Request("GET", "/health")
    body = json.dumps({"image": GOOD_B64, "prompt": "<CAPTION>"}).encode()
    headers = [("Authorization", f"Bearer {API_KEY}".encode()), ("Content-Type", b"application/json")]
    caption = Request("POST", "/process_image", headers, body)
    try:
        return send(base_url, health) == 200 and send(base_url, caption) == 200
    except (OSError, AssertionError):
        return False


def fuzz(base_url: str, examples: int, statuses: Counter[int], *, seed: int | None = None) -> None:
    """Send ``examples`` generated requests, counting replies in ``statuses``; raise (with a
    shrunk example) at the first 5xx or request without an answer."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(requests)
    def no_5xx(request: Request) -> None:
        status = send(base_url, request)
        statuses[status] += 1
        assert status < 500, f"HTTP {status} for {request.wire()[:600]!r}"

    if seed is not None:
        no_5xx = hypothesis_seed(seed)(no_5xx)
    no_5xx()


# --- the server -----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(args: argparse.Namespace, log_path: Path) -> Iterator[str]:
    script = Path(sys.executable).with_name("vision-server")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "vision_server"]
    command = [
        *base, "serve", "--model", args.model, "--cache-dir", str(args.cache_dir),
        "--host", "127.0.0.1", "--port", "0", "--preload", "--idle-timeout", "-1",
        "--max-new-tokens", str(args.max_new_tokens),
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith("VISION_SERVER_")}
    env.update(
        PYTHONUNBUFFERED="1",
        XDG_CONFIG_HOME=str(log_path.parent / "config"),
        VISION_SERVER_API_KEY=API_KEY,
        VISION_SERVER_ADMIN_KEY=ADMIN_KEY,
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (found := _LISTENING.search(log_path.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="requests to generate (default 5000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized)")
    parser.add_argument("--model", default="test:tiny", help="model to serve (default: the tiny test model)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "vision-fuzz-cache")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--url", help="fuzz this running server instead (it must use this script's keys)")
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    started = time.monotonic()
    error = None
    with tempfile.TemporaryDirectory(prefix="vision-fuzz-") as tmp:
        log_path = Path(tmp) / "server.log"
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(running_server(args, log_path))
            statuses: Counter[int] = Counter()
            try:
                fuzz(url, args.examples, statuses, seed=args.seed)
            except Exception as exc:  # the shrunk failing example, or a connection without answer
                error = f"{type(exc).__name__}: {exc}"
            serves = still_serves(url)
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
    results = {
        "examples": args.examples,
        "seed": args.seed,
        "seconds": round(time.monotonic() - started, 1),
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "responses_5xx": sum(count for code, count in statuses.items() if code >= 500),
        "error": error,
        "checks": {
            "no_5xx_or_missing_answer": error is None,
            "still_serves": serves,
            "no_traceback_in_log": "Traceback" not in log,
        },
    }
    print(f"{'examples':<28}{args.examples}")
    print(f"{'seconds':<28}{results['seconds']}")
    for code, count in results["statuses"].items():
        print(f"{'HTTP ' + code:<28}{count}")
    for name, ok in results["checks"].items():
        print(f"{name:<28}{'ok' if ok else 'FAILED'}")
    if error:
        print(error)
    if not all(results["checks"].values()):
        print("server log (end):\n" + log[-3000:])
    print(json.dumps(results))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
