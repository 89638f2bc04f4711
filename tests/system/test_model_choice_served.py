"""A real server process with two named models (tiny Florence-2 ``large``, tiny BLIP ``blip``):
the "Picking a model per request" examples of docs/api/index.md run as written, the clients
(vision-client, the bash client, the ComfyUI node) take a model, and the web page's model
pickers (Try it, the gallery) caption with the chosen model.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tests.support.api import json_documents, tiny_cache_dir
from tests.support.browser import browser_tab
from tests.support.gallery_data import make_gallery
from tests.support.images import image_bytes
from tests.support.processes import ServerProcess, cli_command, http_json, server_env
from tests.support.scripts import import_file

if TYPE_CHECKING:
    from playwright.sync_api import Page

DOC = Path(__file__).parents[2] / "docs" / "api" / "index.md"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, generic_model_dirs: dict[str, Path]) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("two-models")
    command = [
        *cli_command(),
        "serve",
        "--model",
        "large=test:tiny",
        "--model",
        f"blip={generic_model_dirs['blip']}",
    ]
    command += ["--cache-dir", str(tiny_cache_dir(tmp_path_factory)), "--idle-timeout", "-1"]
    command += ["--max-new-tokens", "8", "--gallery", str(make_gallery(tmp).root)]
    env = {**server_env(tmp), "OMP_NUM_THREADS": "1"}
    with ServerProcess(command, env, tmp / "server.log") as process:
        yield process.wait_listening(timeout=90)
        process.stop()


def section_blocks() -> list[str]:
    """The ``sh`` blocks of the docs section "Picking a model per request"."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Picking a model per request\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S)


def run(block: str, server: str, tmp: Path) -> str:
    (tmp / "photo.jpg").write_bytes(image_bytes(81, "JPEG"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "VISION_URL": server, "IMAGE": str(tmp / "photo.jpg")}
    done = subprocess.run(
        ["bash", "-c", f"set -eo pipefail\n{block}"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{block}\n{done.stderr}"
    return done.stdout


def test_the_docs_examples_pick_each_model_as_written(server: str, tmp_path: Path) -> None:
    start, examples, unknown = section_blocks()
    assert "--model large=" in start and "--model blip=" in start  # the server this test starts
    replies = json_documents(run(examples, server, tmp_path))
    assert len(replies) == len(re.findall(r"\bcurl\s", examples))
    for reply in replies:
        assert not (isinstance(reply, dict) and {"error", "detail"} & set(reply)), reply
    native, prompts, chat, listed, extras, form, loaded, unloaded = replies
    assert prompts == ["<CAPTION>"]
    assert chat["model"] == "blip" and form["model_info"]["model"] == "blip"
    assert native["result"] == extras["caption"] == form["caption"]  # one image, one task, one model
    # only blip captioned so far: each model loads on its own first request
    assert [(m["id"], m["state"]) for m in listed["data"]] == [("large", "unloaded"), ("blip", "ready")]
    assert {m["name"]: m["state"] for m in loaded["models"]} == {"large": "ready", "blip": "ready"}
    assert {m["name"]: m["state"] for m in unloaded["models"]} == {"large": "ready", "blip": "unloaded"}

    # The 404 is the one the docs show, word for word.
    lines = unknown.strip().splitlines()
    command, shown = "\n".join(line for line in lines if not line.startswith("#")), lines[-1]
    assert shown.startswith("# 404 ")
    assert json_documents(run(command, server, tmp_path)) == [json.loads(shown.removeprefix("# 404 "))]


def vision_client(server: str, *args: str) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("vision-client")), "--url", server, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_vision_client_model_option_picks_the_model(server: str, tmp_path: Path) -> None:
    image = tmp_path / "cli.png"
    image.write_bytes(image_bytes(83))
    assert vision_client(server, "--model", "blip", "prompts") == "<CAPTION>\n"
    blip = vision_client(server, "--model", "blip", "caption", str(image), "--task", "CAPTION").strip()
    default = vision_client(server, "caption", str(image), "--task", "CAPTION").strip()
    assert blip == native_caption(server, image.read_bytes(), "blip")
    assert default == native_caption(server, image.read_bytes(), "large") != blip


def shell_client(server: str, *args: str, model: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "VISION_HOST": server, **({"VISION_MODEL": model} if model else {})}
    script = Path(__file__).parents[2] / "clients" / "vision-client.sh"
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_bash_client_takes_a_model_by_option_or_environment(server: str, tmp_path: Path) -> None:
    image = tmp_path / "shell.png"
    image.write_bytes(image_bytes(84))
    blip = native_caption(server, image.read_bytes(), "blip")
    for args, model in ((("--model", "blip"), None), ((), "blip"), (("--model=blip",), "large")):
        done = shell_client(server, *args, "CAPTION", str(image), model=model)
        assert (done.returncode, done.stdout) == (0, blip + "\n"), done.stderr
    done = shell_client(server, "prompts", model="blip")
    assert json.loads(done.stdout) == ["<CAPTION>"]
    assert (
        shell_client(server, "CAPTION", str(image)).stdout
        == native_caption(server, image.read_bytes(), "large") + "\n"
    )
    done = shell_client(server, "--model", "no such", "CAPTION", str(image))
    assert done.returncode == 1 and "HTTP 404" in done.stderr and "large, blip" in done.stderr
    done = shell_client(server, "prompts", model="no such/thing")
    assert done.returncode == 1 and "HTTP 404" in done.stderr and "'no such/thing'" in done.stderr


def test_the_comfyui_node_takes_a_model(server: str) -> None:
    node_dir = Path(__file__).parents[2] / "clients" / "comfyui"
    node = import_file(node_dir / "vision_caption_node.py", "comfyui_node_model_choice")
    images = np.random.default_rng(9).random((2, 40, 48, 3), dtype=np.float32)
    pngs = [node.png_bytes(image) for image in images]
    captions = node.VisionServerCaption().caption(images, "<CAPTION>", server, timeout=60, model="blip")[1]
    assert captions == [native_caption(server, png, "blip") for png in pngs]
    assert node.caption_batch(images, "CAPTION", server, timeout=60) == [
        native_caption(server, png, "large") for png in pngs
    ]
    with pytest.raises(RuntimeError, match="answered 404"):
        node.caption_batch(images[:1], "CAPTION", server, timeout=60, model="nope")


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Page]:
    with browser_tab(TIMEOUT_MS) as tab:
        tab.goto(server + "/#try")
        tab.wait_for_selector("body[data-ready=true]")
        yield tab


def native_caption(server: str, image: bytes, model: str) -> str:
    body = {"image": base64.b64encode(image).decode(), "prompt": "<CAPTION>", "model": model}
    status, reply = http_json(server + "/process_image", body)
    assert status == 200, reply
    return str(reply["result"])


def test_the_page_picks_the_model_and_shows_its_tasks(page: Page, server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    assert page.locator("#model-choice").is_visible()
    assert page.locator("#model option").all_inner_texts() == ["large", "blip"]
    assert page.input_value("#model") == "large"
    _, large_tasks = http_json(server + "/prompts?model=large")
    assert page.locator("#task option").all_inner_texts() == large_tasks
    image = tmp_path / "picked.png"
    image.write_bytes(image_bytes(82))
    page.select_option("#task", "<CAPTION>")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("body[data-try-state=done]")
    expect(page.locator("#try-caption")).to_have_text(native_caption(server, image.read_bytes(), "large"))
    expect(page.locator("#try-timing")).to_have_text(re.compile(r"^large: <CAPTION> in "))

    page.select_option("#model", "blip")  # BLIP has one task; the same image is captioned again
    assert page.locator("#task option").all_inner_texts() == ["<CAPTION>"]
    expect(page.locator("#try-timing")).to_have_text(re.compile(r"^blip: <CAPTION> in "))
    expect(page.locator("#try-caption")).to_have_text(native_caption(server, image.read_bytes(), "blip"))


def test_the_gallery_recaptions_with_the_picked_model(page: Page, server: str) -> None:
    from playwright.sync_api import expect

    page.goto("about:blank")
    page.goto(f"{server}/#gallery")
    page.wait_for_selector("body[data-ready=true][data-gallery=ready]")
    assert page.locator("#gallery-model option").all_inner_texts() == ["large", "blip"]
    page.select_option("#gallery-model", "blip")
    assert page.locator("#gallery-task option").all_inner_texts() == ["<CAPTION>"]
    shown = page.locator('.card[data-path="img01.png"]')
    shown.locator("input.pick").check()
    page.click("#recaption")
    page.wait_for_selector("body[data-recaption=done]")
    assert page.inner_text("#gallery-message") == "captioned 1 of 1 with blip <CAPTION>"
    expect(shown.locator('.source[data-source="blip <CAPTION>"] .source-text')).to_have_text(
        native_caption(server, image_bytes(1), "blip")  # img01.png of the gallery
    )
