"""End-to-end test of `otter demo` in a real headless Chromium (Debian's `chromium`, driven by playwright).

The demo runs as its own process (`python -m otter.cli demo`) on 127.0.0.1 with a tiny random model saved to a
temporary directory. The browser uploads an image, asks two questions and reads the streamed answers from the chat,
which must equal what the model generates for the same prompts; it uploads a text file and reads the error message,
asks about an animated GIF as a video, and uploads a too-large file. Nothing leaves localhost: gradio's analytics are off and Chromium runs without its
background networking.

Chromium must be at /usr/bin/chromium (`apt-get install -y chromium`; `.ci/run` does it). Without it the test fails:
it is never skipped.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_TOKENIZER, tiny_model
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil

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
MAX_NEW_TOKENS = 8
STARTUP_TIMEOUT = (
    120  # seconds for the demo process to import torch, transformers and gradio and listen (a loaded machine)
)
TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("otter-tiny-demo")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = OtterProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(TINY_TOKENIZER))
    tiny_model("otter", seed=1).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def demo_server(model_dir, tmp_path_factory):
    """`otter demo` in its own process; started here, waited for by `page` (so that Chromium starts meanwhile)."""
    log_path = tmp_path_factory.mktemp("demo-log") / "demo.log"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    command = [sys.executable, "-m", "otter.cli", "demo", "--model", str(model_dir), "--port", str(port)]
    command += [
        "--host",
        "127.0.0.1",
        "--device",
        "cpu",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-upload-mb",
        "1",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    yield process, port, log_path
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_listening(process, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"otter demo exited with status {process.returncode}:\n{log_path.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"otter demo did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT}s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
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


@pytest.fixture(scope="module")
def page(demo_server, browser_context):
    process, port, log_path = demo_server
    wait_until_listening(process, port, log_path)
    page = browser_context.new_page()
    errors, elsewhere = [], []
    page.on("pageerror", lambda error: errors.append(error))
    local = (f"http://127.0.0.1:{port}/", "data:", "blob:")
    page.on("request", lambda request: None if request.url.startswith(local) else elsewhere.append(request.url))
    page.goto(f"http://127.0.0.1:{port}/")
    page.locator("#question textarea").wait_for()
    yield page
    assert not errors, f"JavaScript errors in the page: {errors}"
    assert not elsewhere, f"the page requested URLs outside the demo: {elsewhere}"


def status_contains(page, text: str) -> None:
    page.wait_for_function(
        "text => document.querySelector('#status').innerText.includes(text)", arg=text, timeout=TIMEOUT_MS
    )


def model_answer(model_dir, prompt: str, images: list | None = None, videos: list | None = None) -> str:
    model = OtterForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = OtterProcessor.from_pretrained(model_dir)
    inputs = processor(text=prompt, images=images, videos=videos, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False)
    return processor.decode_answer(output[0])


def ask(page, question: str, turn: int) -> str:
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    # the chat and the status change together, from the same update: wait for this turn's answer to be done
    page.wait_for_function(
        """turn => document.querySelectorAll('#chat [data-testid="bot"]').length === turn
                  && document.querySelector('#status').innerText.includes('Done.')""",
        arg=turn,
        timeout=TIMEOUT_MS,
    )
    bot_messages = page.locator('#chat [data-testid="bot"]')
    assert page.locator('#chat [data-testid="user"]').nth(turn - 1).inner_text().strip() == question
    return bot_messages.nth(turn - 1).inner_text().strip()


def test_demo_in_chromium(page, model_dir, tmp_path):
    red = Image.open(RED_CIRCLE).convert("RGB")
    first = model_answer(model_dir, "<image>User: What colour? GPT:<answer>", [red])
    second_prompt = f"<image>User: What colour? GPT:<answer> {first}<|endofchunk|>User: And the shape? GPT:<answer>"
    second = model_answer(model_dir, second_prompt, [red])
    assert first and second  # the tiny model's answers are not empty, so the page must show text

    page.locator("#images input[type=file]").set_input_files(str(RED_CIRCLE))
    status_contains(page, "1 image(s) ready")
    assert page.locator("#preview img").count() == 1

    # the answer streams into the chat; when it is done the chat shows the parsed answer
    assert ask(page, "What colour?", turn=1) == first
    # a second turn keeps the first in the prompt
    assert ask(page, "And the shape?", turn=2) == second

    # a file that is not an image: a one-line message in the page, not a traceback
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image\n")
    page.locator("#images input[type=file]").set_input_files(str(text_file))
    status_contains(page, "notes.txt is not an image")
    status = page.locator("#status").inner_text()
    assert "Traceback" not in status and str(tmp_path) not in status and len(status.strip().splitlines()) == 1
    page.locator("#question textarea").fill("What colour?")
    page.locator("#send").click()  # asking about it gives the same message and no new chat turn
    page.wait_for_timeout(500)
    status_contains(page, "notes.txt is not an image")
    assert page.locator('#chat [data-testid="bot"]').count() == 0  # the new upload started a new conversation

    # a video: an animated GIF, resampled to the model's max_num_frames (8 in the tiny config)
    page.locator("#images button[aria-label='Clear']").first.click()
    gif = tmp_path / "clip.gif"
    frames = [Image.new("RGB", (32, 32), (20 * i, 200 - 15 * i, 40)) for i in range(12)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    page.locator("#video input[type=file]").set_input_files(str(gif))
    status_contains(page, "Video ready: 8 frame(s)")
    video_answer = model_answer(model_dir, "<image>User: What happens? GPT:<answer>", videos=[open_video([gif], 8)])
    assert ask(page, "What happens?", turn=1) == video_answer

    # uploads above --max-upload-mb are refused by gradio before they reach the app
    big_file = tmp_path / "big.png"
    big_file.write_bytes(os.urandom(1_200_000))
    page.locator("#images input[type=file]").set_input_files(str(big_file))
    page.get_by_text("exceed the maximum allowed size").first.wait_for()
