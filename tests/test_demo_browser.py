"""End-to-end tests of `otter demo` in a real headless Chromium (Debian's `chromium`, driven by playwright).

Two demos run as their own processes (`python -m otter.cli demo`), started together:

- `otter demo --port P` with every other setting left alone (the embedded default model, bound to the default
  127.0.0.1): it must listen on 127.0.0.1 only. The browser uploads a bundled example image and asks two questions
  (the answers are "red" and "circle"), uploads a text file and reads the error message, asks about an animated GIF
  as a video ("right"), uploads a too-large file, and two browser pages ask at the same time (the queue);
- a tiny random model saved to a temporary directory, whose long answers show the chat growing as it streams.

Nothing leaves localhost: gradio's analytics are off and Chromium runs without its background networking.

Chromium must be at /usr/bin/chromium (`apt-get install -y chromium`; `.ci/run` does it). Without it the tests fail:
they are never skipped.
"""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import torch
from conftest import REPO_ROOT, TINY_TOKENIZER, tiny_model
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil

import otter
from otter import OtterForConditionalGeneration, OtterProcessor
from otter.demo import open_video

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these Chromium calls Google services, and this machine's closed network refuses its connections
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RED_CIRCLE = REPO_ROOT / "examples" / "images" / "red_circle.png"
BLUE_SQUARE = REPO_ROOT / "examples" / "images" / "blue_square.png"
FRAMES = REPO_ROOT / "examples" / "frames" / "purple_circle_moving_right"
DEFAULT_MAX_NEW_TOKENS = 64  # `otter demo`'s default; the embedded model ends its answers after a word
TINY_MAX_NEW_TOKENS = 32  # the tiny random model never stops early: a long answer to watch streaming in
STARTUP_TIMEOUT = (
    120  # seconds for a demo process to import torch, transformers and gradio and listen (a loaded machine)
)
TIMEOUT_MS = 30_000


class Server(NamedTuple):
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("otter-tiny-demo")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = OtterProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(TINY_TOKENIZER))
    tiny_model("otter", seed=1).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """Both demos, each in its own process, started at once; waited for by the tests (so Chromium starts meanwhile).
    "default" is `otter demo` with only --port (and --max-upload-mb for the size check): no --host, no --model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    env["OMP_NUM_THREADS"] = "1"  # tiny models; two servers and Chromium share the machine
    options = {
        "default": ["--max-upload-mb", "1"],
        "tiny": ["--model", str(tiny_model_dir), "--host", "127.0.0.1", "--device", "cpu"],
    }
    options["tiny"] += ["--max-new-tokens", str(TINY_MAX_NEW_TOKENS)]
    started = {}
    for name, argv in options.items():
        log_path = tmp_path_factory.mktemp(f"demo-log-{name}") / "demo.log"
        port = free_port()
        command = [sys.executable, "-m", "otter.cli", "demo", "--port", str(port), *argv]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        started[name] = Server(process, port, log_path)
    yield started
    for server in started.values():
        server.process.terminate()
    for server in started.values():
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def wait_until_listening(server: Server) -> Server:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"otter demo exited with status {server.process.returncode}:\n{server.log_path.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", server.port)) == 0:
                return server
        time.sleep(0.2)
    pytest.fail(f"otter demo did not listen on {server.url} within {STARTUP_TIMEOUT}s:\n{server.log_path.read_text()}")


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory, servers):
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path_factory.mktemp("chromium-profile")),  # a new, empty profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@contextmanager
def open_page(context, server: Server):
    """A new page (a new gradio session) on a demo; it must raise no JavaScript error and request nothing else."""
    wait_until_listening(server)
    page = context.new_page()
    errors, elsewhere = [], []
    page.on("pageerror", lambda error: errors.append(error))
    local = (server.url, "data:", "blob:")
    page.on("request", lambda request: None if request.url.startswith(local) else elsewhere.append(request.url))
    page.goto(server.url)
    page.locator("#question textarea").wait_for()
    yield page
    page.close()
    assert not errors, f"JavaScript errors in the page: {errors}"
    assert not elsewhere, f"the page requested URLs outside the demo: {elsewhere}"


@pytest.fixture
def page(servers, browser_context):
    with open_page(browser_context, servers["default"]) as page:
        yield page


def status_contains(page, text: str) -> None:
    page.wait_for_function(
        "text => document.querySelector('#status').innerText.includes(text)", arg=text, timeout=TIMEOUT_MS
    )


def model_answer(model_dir: Path, prompt: str, images=None, videos=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS) -> str:
    """What the model in `model_dir` answers (greedy), as the page should show it when done."""
    model = OtterForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = OtterProcessor.from_pretrained(model_dir)
    inputs = processor(text=prompt, images=images, videos=videos, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return processor.decode_answer(output[0])


def send(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()


def answer_of(page, question: str, turn: int) -> str:
    """The chat's answer to `turn` once it is done (the chat and the status change together, from one update)."""
    page.wait_for_function(
        """turn => document.querySelectorAll('#chat [data-testid="bot"]').length === turn
                  && document.querySelector('#status').innerText.includes('Done.')""",
        arg=turn,
        timeout=TIMEOUT_MS,
    )
    assert page.locator('#chat [data-testid="user"]').nth(turn - 1).inner_text().strip() == question
    return page.locator('#chat [data-testid="bot"]').nth(turn - 1).inner_text().strip()


def ask(page, question: str, turn: int) -> str:
    send(page, question)
    return answer_of(page, question, turn)


def upload_image(page, path: Path) -> None:
    page.locator("#images input[type=file]").set_input_files(str(path))
    status_contains(page, "1 image(s) ready")


def test_demo_in_chromium(page, tmp_path):
    """The embedded model in the page: a two-turn conversation about a bundled image, a bad file, a video, a big file."""
    default_model = otter.default_model_path()
    red = Image.open(RED_CIRCLE).convert("RGB")
    first = model_answer(default_model, "<image>User: What colour is the shape? GPT:<answer>", [red])
    second_prompt = (
        f"<image>User: What colour is the shape? GPT:<answer> {first}<|endofchunk|>User: What shape is it? GPT:<answer>"
    )
    second = model_answer(default_model, second_prompt, [red])
    assert (first, second) == ("red", "circle")

    upload_image(page, RED_CIRCLE)
    assert page.locator("#preview img").count() == 1
    assert "otter-tiny-shapes" in page.locator("body").inner_text()  # the page names the embedded model

    # the answer streams into the chat; when it is done the chat shows the parsed answer
    assert ask(page, "What colour is the shape?", turn=1) == "red"
    # a second turn keeps the first in the prompt
    assert ask(page, "What shape is it?", turn=2) == "circle"

    # a file that is not an image: a one-line message in the page, not a traceback
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image\n")
    page.locator("#images input[type=file]").set_input_files(str(text_file))
    status_contains(page, "notes.txt is not an image")
    status = page.locator("#status").inner_text()
    assert "Traceback" not in status and str(tmp_path) not in status and len(status.strip().splitlines()) == 1
    send(page, "What colour is the shape?")  # asking about it gives the same message and no new chat turn
    page.wait_for_timeout(500)
    status_contains(page, "notes.txt is not an image")
    assert page.locator('#chat [data-testid="bot"]').count() == 0  # the new upload started a new conversation

    # a video: an animated GIF of 12 frames (the bundled clip, each frame 3 times), resampled to the model's
    # max_num_frames (4): frames 0, 4, 7 and 11, one of each bundled frame
    page.locator("#images button[aria-label='Clear']").first.click()
    gif = tmp_path / "clip.gif"
    frames = [Image.open(path).convert("RGB") for path in sorted(FRAMES.iterdir()) for _ in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    page.locator("#video input[type=file]").set_input_files(str(gif))
    status_contains(page, "Video ready: 4 frame(s)")
    prompt = "<image>User: Which way does it move? GPT:<answer>"
    assert model_answer(default_model, prompt, videos=[open_video([gif], 4)]) == "right"
    assert ask(page, "Which way does it move?", turn=1) == "right"

    # uploads above --max-upload-mb are refused by gradio before they reach the app
    big_file = tmp_path / "big.png"
    big_file.write_bytes(os.urandom(1_200_000))
    page.locator("#images input[type=file]").set_input_files(str(big_file))
    page.get_by_text("exceed the maximum allowed size").first.wait_for()


def test_demo_listens_on_localhost_only_by_default(servers):
    """Started without --host, the demo's only listening socket is 127.0.0.1:port (not 0.0.0.0 or ::), and the
    machine's other addresses refuse connections on that port."""
    server = wait_until_listening(servers["default"])
    listening = [
        connection.laddr
        for connection in psutil.Process(server.process.pid).net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]
    assert listening == [("127.0.0.1", server.port)], listening
    other_addresses = [
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and not address.address.startswith("127.")
    ]
    for address in other_addresses:  # none on a machine without a network: the check above is the one that counts
        with socket.socket() as sock:
            sock.settimeout(5)
            assert sock.connect_ex((address, server.port)) != 0, f"the demo accepts connections on {address}"


def test_two_users_at_once(servers, browser_context):
    """Two browsers ask at the same moment; both get their own answers (test_demo.py checks the queue settings)."""
    with (
        open_page(browser_context, servers["default"]) as first,
        open_page(browser_context, servers["default"]) as other,
    ):
        upload_image(first, RED_CIRCLE)
        upload_image(other, BLUE_SQUARE)
        first.locator("#question textarea").fill("What colour is the shape?")
        other.locator("#question textarea").fill("What colour is the shape?")
        first.locator("#send").click()
        other.locator("#send").click()
        assert answer_of(first, "What colour is the shape?", turn=1) == "red"
        assert answer_of(other, "What colour is the shape?", turn=1) == "blue"
        # each session kept its own conversation
        assert "blue" not in first.locator("#chat").inner_text() and "red" not in other.locator("#chat").inner_text()


def test_answers_stream_into_the_chat(servers, browser_context, tiny_model_dir):
    """While the status says "Generating...", the chat shows longer and longer beginnings of the answer; the last
    text is the model's whole answer."""
    red = Image.open(RED_CIRCLE).convert("RGB")
    expected = model_answer(
        tiny_model_dir, "<image>User: What colour? GPT:<answer>", [red], max_new_tokens=TINY_MAX_NEW_TOKENS
    )
    assert len(expected) >= 8
    with open_page(browser_context, servers["tiny"]) as page:
        upload_image(page, RED_CIRCLE)
        # record every text the answer shows, with the status at that moment, as the page changes
        page.evaluate(
            """() => {
                window.seen = [];
                const record = () => {
                    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
                    const status = document.querySelector('#status').innerText;
                    if (bots.length) window.seen.push([bots[bots.length - 1].innerText.trim(), status.trim()]);
                };
                new MutationObserver(record).observe(
                    document.body, {subtree: true, childList: true, characterData: true}
                );
            }"""
        )
        assert ask(page, "What colour?", turn=1) == expected
        seen = page.evaluate("window.seen")
    partial = {text for text, status in seen if text and text != expected and status.startswith("Generating")}
    assert len(partial) >= 2, f"the answer did not stream: {seen}"
    assert all(expected.startswith(text) for text in partial), (expected, partial)
