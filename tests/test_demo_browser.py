"""End-to-end tests of `otter demo` in a real headless Chromium (Debian's `chromium`, driven by playwright).

Two demos run as their own processes (`python -m otter.cli demo`), started together:

- `otter demo --port P` with every other setting left alone (the embedded default model, bound to the default
  127.0.0.1): it must listen on 127.0.0.1 only. The browser uploads a bundled example image and asks two questions
  (the answers are "red" and "circle"), uploads a text file and reads the error message, asks about an animated GIF
  as a video ("right"), uploads a too-large file, and two browser pages ask at the same time (the queue);
- a tiny random model saved to a temporary directory, whose long answers show the chat growing as it streams, and
  two pages asking at once are answered one after the other (the queue runs one generation at a time). This demo
  runs `otter.cli.main(["demo", ...])` with `otter.demo.stream_answer` wrapped to write when each generation starts
  and ends (the server's own clock: what the pages show can lag behind it).

Nothing leaves localhost: gradio's analytics are off and Chromium runs without its background networking.

Chromium must be at /usr/bin/chromium (`apt-get install -y chromium`; `.ci/run` does it). Without it the tests fail:
they are never skipped.
"""

import json
import os
import re
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
# `python -c RECORDING_DEMO LOG demo ...`: `otter demo ...`, each generation appending a JSON line to LOG (its prompt,
# answer, and the times, in seconds since the epoch, when it started, first had text, and ended)
RECORDING_DEMO = """
import json, sys, time
import otter.demo
from otter.cli import main

log_path = sys.argv.pop(1)
stream_answer = otter.demo.stream_answer

def recorded(model, processor, inputs, **kwargs):
    record = {"prompt": processor.tokenizer.decode(inputs["input_ids"][0]), "start": time.time()}
    text = ""
    for text, finished in stream_answer(model, processor, inputs, **kwargs):
        if text and "first" not in record:
            record["first"] = time.time()
        yield text, finished
    record.update(end=time.time(), answer=text)
    with open(log_path, "a") as log:
        log.write(json.dumps(record) + "\\n")

otter.demo.stream_answer = recorded
sys.exit(main(sys.argv[1:]))
"""


class Server(NamedTuple):
    process: subprocess.Popen
    port: int
    log_path: Path
    generations: Path | None = None  # RECORDING_DEMO's log

    def generation_records(self) -> list[dict]:
        return [json.loads(line) for line in self.generations.read_text().splitlines()]

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
    "default" is `otter demo` with only --port (and --max-upload-mb for the size check): no --host, no --model;
    "tiny" records its generations (RECORDING_DEMO)."""
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
        generations = None
        if name == "tiny":
            generations = log_path.with_name("generations.jsonl")
            generations.touch()
            command[1:3] = ["-c", RECORDING_DEMO, str(generations)]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        started[name] = Server(process, port, log_path, generations)
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
    """Two browsers ask at the same moment; both get their own answers (test_demo.py checks the queue settings,
    test_queue_answers_one_page_after_the_other that they run one at a time)."""
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


# Records, in window.seen, each change of the answer (the last bot message), the status line, or the queue state that
# gradio's progress tracker shows in the status ("queue: 1/1", "processing"), with the time (ms since the epoch).
RECORD_CHANGES = r"""() => {
    window.seen = [];
    const chat = document.querySelector('#chat'), status = document.querySelector('#status');
    const record = () => {
        const bots = chat.querySelectorAll('[data-testid="bot"]');
        const answer = bots.length ? bots[bots.length - 1].textContent.trim() : '';
        const text = status.textContent;
        const queue = (text.match(/queue: \d+\/\d+|processing/) || [''])[0];
        const state = text.includes('Generating...') ? 'Generating...' : text.includes('Done.') ? 'Done.' : '';
        const last = window.seen[window.seen.length - 1];
        if (!last || last[1] !== answer || last[2] !== state || last[3] !== queue)
            window.seen.push([performance.timeOrigin + performance.now(), answer, state, queue]);
    };
    const observer = new MutationObserver(record);  // textContent only: no layout, so the page is not slowed down
    for (const node of [chat, status]) observer.observe(node, {subtree: true, childList: true, characterData: true});
    record();
}"""


def test_queue_answers_one_page_after_the_other(servers, browser_context):
    """Two pages click Send at the same moment on the tiny model (32 streamed tokens each). With the default
    --concurrency 1 the second generation starts only after the first has ended: so says the server's record of
    the two generations, and the page that waited shows its place in the queue, then its answer, whose first part
    appears after the first generation ended. Both pages get their whole answers.

    The pages alone cannot show that the generations did not overlap: while the first page is still drawing its
    answer (it lags behind the stream on a loaded machine), the second page may already show its own first tokens."""
    server = servers["tiny"]
    questions = ("Is it round?", "Is it small?")
    with (
        open_page(browser_context, server) as first,
        open_page(browser_context, server) as other,
    ):
        pages = dict(zip(questions, (first, other), strict=True))
        for question, page in pages.items():
            upload_image(page, RED_CIRCLE)
            page.locator("#question textarea").fill(question)
            page.evaluate(RECORD_CHANGES)
        for page in pages.values():  # back to back, without playwright's checks in between
            page.evaluate("() => document.querySelector('#send').click()")
        answers = {question: answer_of(page, question, turn=1) for question, page in pages.items()}
        seen = {question: page.evaluate("window.seen") for question, page in pages.items()}

    records = {}
    for record in server.generation_records():
        for question in questions:
            if f"User: {question} GPT:" in record["prompt"]:
                assert question not in records, record
                records[question] = record
    assert records.keys() == set(questions), server.generation_records()
    earlier, later = sorted(questions, key=lambda question: records[question]["start"])
    # the server ran them one after the other
    assert records[later]["start"] >= records[earlier]["end"], records
    # each page shows its own whole answer
    for question in questions:
        assert answers[question] == records[question]["answer"].strip() != "", (answers, records)
        assert seen[question][-1][1:3] == [answers[question], "Done."], seen[question]
    # the page that waited showed its place in the queue before its answer began, and its answer began to show
    # only after the first generation had ended (the pages' clock and the server's are this machine's)
    waiting, first_text = [], None
    for time_ms, answer, _, queue in seen[later]:
        if answer:
            first_text = time_ms
            break
        waiting.append(queue)
    assert any(re.fullmatch(r"queue: \d+/\d+", queue) for queue in waiting), seen[later]
    assert first_text > records[earlier]["end"] * 1000, (first_text, records)
