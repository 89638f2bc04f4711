"""The ComfyUI node's logic without ComfyUI: numpy batch -> PNG -> HTTP -> captions.

The node folder is loaded the way ComfyUI loads a custom node (as a package from its path), and
talks to a small threaded HTTP stand-in, since the node itself uses blocking urllib. The last
test calls the node with real [B,H,W,C] batches against a live ``vision-server`` (tiny model).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import email.utils
import io
import itertools
import json
import socket
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from tests.support import paths
from tests.support.scripts import import_file
from tests.support.stand_in import PROMPTS
from tests.support.tls import self_signed

NODE_DIR = paths.CLIENTS / "comfyui"


@pytest.fixture(scope="module")
def package() -> ModuleType:
    """Import ``clients/comfyui`` under an unrelated name, as ComfyUI's loader does."""
    return import_file(NODE_DIR / "__init__.py", "vision_server_caption_node_under_test", package=True)


@pytest.fixture(scope="module")
def node(package: ModuleType) -> ModuleType:
    return sys.modules[f"{package.__name__}.vision_caption_node"]


class Recorder:
    """What the stand-in server saw, and how it should answer."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self.busy_first = 0  # answer this many requests with 503 + Retry-After first
        self.reject = False
        self.delay = 0.0
        self.together = 0  # hold each request until this many are in flight (30 s at most)
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Condition()


@pytest.fixture
def server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with recorder.lock:
                recorder.bodies.append(body)
                recorder.headers.append(dict(self.headers))
                recorder.arrivals.append(time.monotonic())
                recorder.in_flight += 1
                recorder.max_in_flight = max(recorder.max_in_flight, recorder.in_flight)
                busy = recorder.busy_first > 0
                recorder.busy_first -= busy
                recorder.lock.notify_all()
                if not recorder.lock.wait_for(
                    lambda: recorder.max_in_flight >= recorder.together, timeout=30
                ):
                    recorder.together = 0  # never came: the rest need not wait too
            time.sleep(recorder.delay)
            with recorder.lock:
                recorder.in_flight -= 1
            if busy:
                self.reply(503, {"detail": "Queue is full"}, {"Retry-After": "1"})
            elif recorder.reject:
                self.reply(400, {"detail": "Invalid prompt '<NOPE>'. Valid prompts: <CAPTION>"})
            else:
                pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))))
                self.reply(200, {"result": f" {body['prompt']} r={pixels[0, 0, 0]} \n"})

        def reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield url + "/", recorder


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` on a local port in a thread while the block runs; its ``http://`` URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def batch(reds: list[int], height: int = 6, width: int = 5) -> np.ndarray:
    """A ComfyUI-style IMAGE batch [B,H,W,3] of floats, image i filled with red level reds[i]."""
    images = np.zeros((len(reds), height, width, 3), dtype=np.float32)
    for i, red in enumerate(reds):
        images[i, ..., 0] = red / 255.0
        images[i, ..., 2] = 1.0
    return images


def test_registers_the_node(package: ModuleType) -> None:
    assert package.NODE_DISPLAY_NAME_MAPPINGS == {"VisionServerCaption": "Vision Server Caption"}
    cls = package.NODE_CLASS_MAPPINGS["VisionServerCaption"]
    inputs = cls.INPUT_TYPES()
    assert inputs["required"]["image"] == ("IMAGE",)
    tasks, options = inputs["required"]["task"]
    assert tasks == PROMPTS  # the PromptGen v2.0 task list, as the server lists it
    assert options["default"] in tasks
    assert inputs["required"]["server_url"][1]["default"] == "http://127.0.0.1:54880"
    assert "api_key" in inputs["optional"]
    assert cls.RETURN_TYPES == ("STRING", "STRING")
    assert cls.OUTPUT_IS_LIST == (False, True)
    assert callable(getattr(cls(), cls.FUNCTION))


def test_uses_only_stdlib_numpy_and_pillow() -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "PIL", "__future__"}
    for path in NODE_DIR.glob("*.py"):
        for stmt in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(stmt, ast.Import):
                names = [alias.name for alias in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0:
                names = [stmt.module or ""]
            else:
                continue
            assert {name.split(".")[0] for name in names} <= allowed, path.name


def test_batch_shapes(node: ModuleType) -> None:
    assert node.to_numpy_batch(batch([1, 2])).shape == (2, 6, 5, 3)
    assert node.to_numpy_batch(batch([1])[0]).shape == (1, 6, 5, 3)  # a single [H,W,C] image
    with pytest.raises(ValueError, match=r"\[B,H,W,C\]"):
        node.to_numpy_batch(np.zeros((2, 3, 6, 5)))  # channels first is not ComfyUI's layout


def test_torch_tensor_is_accepted(node: ModuleType) -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(batch([10, 20]))
    assert np.array_equal(node.to_numpy_batch(tensor), batch([10, 20]))


def test_png_round_trip(node: ModuleType) -> None:
    image = batch([128])[0]
    image[0, 0] = [2.0, -1.0, 0.5]  # out-of-range values are clipped, not wrapped
    decoded = np.asarray(Image.open(io.BytesIO(node.png_bytes(image))))
    assert decoded.shape == (6, 5, 3)
    assert decoded.dtype == np.uint8
    assert decoded[1, 1].tolist() == [128, 0, 255]
    assert decoded[0, 0].tolist() == [255, 0, 128]
    gray = np.asarray(Image.open(io.BytesIO(node.png_bytes(np.full((4, 4, 1), 0.5, np.float32)))))
    assert gray.shape == (4, 4)


def test_captions_in_batch_order(node: ModuleType, server: tuple[str, Recorder]) -> None:
    url, recorder = server
    reds = [10, 20, 30, 40]
    # Each request is held until all four are in: one at a time, the first would wait 30 s alone.
    recorder.together = len(reds)
    captions = node.caption_batch(batch(reds), "caption", url, api_key="sekret")
    assert captions == [f"<CAPTION> r={red}" for red in reds]
    assert recorder.max_in_flight == len(reds)  # sent in parallel so the server can batch them
    assert {h["Authorization"] for h in recorder.headers} == {"Bearer sekret"}
    assert {b["prompt"] for b in recorder.bodies} == {"<CAPTION>"}


def test_node_outputs_joined_text_and_list(package: ModuleType, server: tuple[str, Recorder]) -> None:
    url, recorder = server
    node = package.NODE_CLASS_MAPPINGS["VisionServerCaption"]()
    joined, captions = node.caption(batch([1, 2]), "<ANALYZE>", url)
    assert captions == ["<ANALYZE> r=1", "<ANALYZE> r=2"]
    assert joined == "<ANALYZE> r=1\n<ANALYZE> r=2"
    assert all("Authorization" not in h for h in recorder.headers)


def test_busy_server_is_retried_after_retry_after(node: ModuleType, server: tuple[str, Recorder]) -> None:
    url, recorder = server
    recorder.busy_first = 1
    assert node.caption_batch(batch([7]), "<CAPTION>", url) == ["<CAPTION> r=7"]
    assert len(recorder.arrivals) == 2
    assert recorder.arrivals[1] - recorder.arrivals[0] >= 1.0


def test_the_node_rides_out_five_busy_answers_as_every_client_does(
    node: ModuleType, server: tuple[str, Recorder]
) -> None:
    """Five "queue full" answers (``Retry-After: 1``): the node retries 5 times, as every client
    (docs/clients/index.md#retries); it gave up after 3."""
    url, recorder = server
    recorder.busy_first = 5
    assert node.caption_batch(batch([7]), "<CAPTION>", url) == ["<CAPTION> r=7"]
    assert len(recorder.arrivals) == 6
    assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(recorder.arrivals))


def test_the_node_waits_on_the_schedule_of_every_client(node: ModuleType) -> None:
    """Without ``Retry-After``: 0.5, 1, 2... s (at most 30 s), each between half of that and all
    of it; ``Retry-After`` up to 120 s plus up to a tenth. It waited 1, 2, 4 s, and at most 60 s
    whatever the server asked."""
    for _ in range(50):
        for attempt, full in enumerate((0.5, 1.0, 2.0)):
            assert full / 2 <= node._retry_delay(None, attempt) <= full
        assert 15.0 <= node._retry_delay(None, 9) <= 30.0
        assert 120.0 <= node._retry_delay("600", 0) <= 132.05
        assert 1.0 <= node._retry_delay("1", 3) <= 1.15


def test_the_node_reads_retry_after_as_every_client_does(node: ModuleType) -> None:
    """``Retry-After`` as an HTTP date, in each of RFC 9110's three forms, is waited for (the node
    read seconds only, and backed off 0.25 to 0.5 s instead); a past date means at once, and a
    fraction is kept, as in vision_server/client/retry.py."""
    ahead = time.time() + 6
    moment = time.gmtime(ahead)
    dates = [
        email.utils.formatdate(ahead, usegmt=True),  # Sun, 06 Nov 1994 08:49:37 GMT
        time.strftime("%A, %d-%b-%y %H:%M:%S GMT", moment),  # Sunday, 06-Nov-94 08:49:37 GMT
        time.strftime("%a %b ", moment) + f"{moment.tm_mday:2d}" + time.strftime(" %H:%M:%S %Y", moment),
    ]
    for date in dates:
        assert 4.5 <= node._retry_delay(date, 0) <= 6.0 * 1.1 + 0.05, date
    for past in (
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ):
        assert node._retry_delay(past, 3) <= 0.05, past
    assert 2.5 <= node._retry_delay("2.5", 0) <= 2.5 * 1.1 + 0.05
    assert node._retry_delay("soon", 0) <= 0.5  # unreadable: the back-off


def test_server_error_message_reaches_the_user(node: ModuleType, server: tuple[str, Recorder]) -> None:
    url, recorder = server
    recorder.reject = True
    with pytest.raises(RuntimeError, match=r"400: Invalid prompt '<NOPE>'"):
        node.caption_batch(batch([1]), "nope", url)
    assert len(recorder.arrivals) == 1


def test_unreachable_server(node: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.time, "sleep", lambda _s: None)
    with pytest.raises(RuntimeError, match="cannot reach vision-server"):
        node.request_caption(b"png", "<CAPTION>", "http://127.0.0.1:1", timeout=2)


def test_key_and_url_from_the_environment(
    node: ModuleType, server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key typed into the node is saved in the workflow and in every PNG ComfyUI writes, so the
    node takes it from VISION_API_KEY when its field is empty (and the URL from VISION_HOST), as
    every other client does."""
    url, recorder = server
    monkeypatch.setenv("VISION_API_KEY", "env-key")
    monkeypatch.setenv("VISION_HOST", url)
    assert node.caption_batch(batch([3]), "<CAPTION>", "") == ["<CAPTION> r=3"]
    assert node.caption_batch(batch([4]), "<CAPTION>", url, api_key="typed-key") == ["<CAPTION> r=4"]
    assert [h.get("Authorization") for h in recorder.headers] == ["Bearer env-key", "Bearer typed-key"]
    monkeypatch.delenv("VISION_API_KEY")
    node.caption_batch(batch([5]), "<CAPTION>", url)
    assert "Authorization" not in recorder.headers[-1]
    tip = node.VisionServerCaption.INPUT_TYPES()["optional"]["api_key"][1]["tooltip"]
    assert "VISION_API_KEY" in tip and "metadata" in tip


def test_refused_key_says_where_the_node_takes_it_from(node: ModuleType) -> None:
    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"detail": "Missing API key: send the header ..."}).encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Refusing) as url:
        with pytest.raises(RuntimeError, match=r"answered 401: Missing API key.*VISION_API_KEY"):
            node.request_caption(b"png", "<CAPTION>", url)


@contextmanager
def accepting(on_connection: Callable[[socket.socket], None]) -> Iterator[int]:
    """A port whose thread hands each connection to ``on_connection``, then closes it; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                on_connection(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def tls_port(tmp_path: Path, handshakes: list[str]) -> contextlib.AbstractContextManager[int]:
    """A port that speaks TLS with a self-signed certificate and records how each handshake ended
    (it hangs up on plain HTTP, as the server with --ssl-cert does)."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def handshake(conn: socket.socket) -> None:
        try:
            context.wrap_socket(conn, server_side=True).close()
            handshakes.append("done")
        except (ssl.SSLError, OSError) as exc:
            handshakes.append(type(exc).__name__)

    return accepting(handshake)


@pytest.fixture
def dropping() -> Iterator[tuple[str, Recorder]]:
    """A port that reads each request, then closes the connection without an answer (a server
    restarting, a proxy dropping its backend), or with ``recorder.delay`` > 0 first waits that long."""
    recorder = Recorder()

    def drop(conn: socket.socket) -> None:
        if conn.recv(1 << 20).startswith(b"POST"):  # not the node's TLS probe of a port that hung up
            recorder.arrivals.append(time.monotonic())
        time.sleep(recorder.delay)

    with accepting(drop) as port:
        yield f"http://127.0.0.1:{port}", recorder


def test_dropped_connection_is_retried_then_named(
    node: ModuleType, dropping: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README promises a dropped connection is retried; the last failure names the server."""
    monkeypatch.setattr(node.time, "sleep", lambda _s: None)
    url, recorder = dropping
    with pytest.raises(RuntimeError, match=r"the connection to vision-server at .* broke"):
        node.request_caption(b"png", "<CAPTION>", url, retries=2)
    assert len(recorder.arrivals) == 3


def test_timeout_says_which_server_and_what_to_raise(
    node: ModuleType, dropping: tuple[str, Recorder]
) -> None:
    url, recorder = dropping
    recorder.delay = 3
    with pytest.raises(RuntimeError, match=r"did not answer within 0.5 s; raise the node's timeout"):
        node.request_caption(b"png", "<CAPTION>", url, timeout=0.5)
    assert len(recorder.arrivals) == 1  # not sent again: the server may still be at work on it


def test_host_and_port_without_scheme(node: ModuleType, server: tuple[str, Recorder]) -> None:
    """``gpu-box:54880`` works as in the other clients (was "unknown url type", after retries)."""
    url, recorder = server
    bare = url.removeprefix("http://")
    assert node.caption_batch(batch([9]), "<CAPTION>", bare) == ["<CAPTION> r=9"]
    assert len(recorder.arrivals) == 1


def test_a_url_that_is_not_a_vision_server(node: ModuleType) -> None:
    """A 200 without a caption (ComfyUI's own port, a web page) says so instead of a KeyError."""

    class Page(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "13")
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args: object) -> None:
            pass

    with serving(Page) as url:
        with pytest.raises(RuntimeError, match=r"without a caption .* is server_url a vision-server"):
            node.request_caption(b"png", "<CAPTION>", url)


def test_untrusted_certificate_is_not_retried(node: ModuleType, tmp_path: Path) -> None:
    """An HTTPS server with a self-signed certificate: one try, and the message names SSL_CERT_FILE."""
    handshakes: list[str] = []
    with tls_port(tmp_path, handshakes) as port:
        with pytest.raises(RuntimeError, match=r"is not trusted .*SSL_CERT_FILE"):
            node.request_caption(b"png", "<CAPTION>", f"https://localhost:{port}", retries=3)
        settled(handshakes, 1)
    assert len(handshakes) == 1, handshakes


def test_plain_http_to_a_tls_port_says_https_and_is_not_retried(
    node: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TLS port hangs up on the plain request; the node's one probe handshake finds TLS there.
    Before, it retried three times and said only that the connection broke."""
    monkeypatch.setattr(node.time, "sleep", lambda _s: None)
    handshakes: list[str] = []
    with tls_port(tmp_path, handshakes) as port:
        with pytest.raises(RuntimeError) as caught:
            node.request_caption(b"png", "<CAPTION>", f"127.0.0.1:{port}", retries=3)
        settled(handshakes, 2)
    assert str(caught.value) == (
        f"vision-server at http://127.0.0.1:{port} hung up without an answer, and that port speaks "
        f"HTTPS: set server_url to https://127.0.0.1:{port}"
    )
    assert sorted(handshakes) == ["SSLError", "done"], handshakes  # the request, then the probe


def settled(handshakes: list[str], count: int) -> None:
    """The server thread notes a handshake after the client has moved on: wait for ``count``
    notes, and a moment more for any retry's, before the caller counts."""
    deadline = time.monotonic() + 10
    while len(handshakes) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Against a live vision-server (tiny test model)


@pytest.fixture(scope="module")
def tiny_server(tiny_server_url: str) -> str:
    """The module's real ``vision-server serve --model test:tiny`` (see conftest)."""
    return tiny_server_url


def native_caption(url: str, image: np.ndarray, task: str) -> str:
    """The server's answer for one [H,W,C] float image sent as PNG over the plain native API."""
    out = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(out, format="PNG")
    body = json.dumps({"image": base64.b64encode(out.getvalue()).decode(), "prompt": task}).encode()
    request = urllib.request.Request(url + "/process_image", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["result"].strip()


def test_node_against_live_server(package: ModuleType, tiny_server: str) -> None:
    # Five different noise images of the same size, as a ComfyUI IMAGE batch [B,H,W,C] in 0..1.
    images = np.random.default_rng(5).random((5, 48, 64, 3), dtype=np.float32)
    expected = [native_caption(tiny_server, image, "<CAPTION>") for image in images]
    assert len(set(expected)) == len(expected)  # distinct, so a mix-up of the order would show
    node = package.NODE_CLASS_MAPPINGS["VisionServerCaption"]()
    function = getattr(node, node.FUNCTION)

    joined, captions = function(images, "<CAPTION>", tiny_server + "/", timeout=60)
    assert captions == expected
    assert joined == "\n".join(expected)

    torch = pytest.importorskip("torch")
    joined, captions = function(torch.from_numpy(images), "<CAPTION>", tiny_server)
    assert captions == expected
    one, single = function(torch.from_numpy(images[2:3]), "<CAPTION>", tiny_server)
    assert (one, single) == (expected[2], [expected[2]])
