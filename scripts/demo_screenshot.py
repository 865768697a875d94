"""Take the screenshot of `otter demo` in the README (docs/demo.png) with Debian's headless Chromium and playwright.

It starts `otter demo` on 127.0.0.1, uploads an image and an in-context example, asks a question, waits for the
streamed answer, and saves the page as a palette PNG (small enough for the repository).

    python scripts/demo_screenshot.py                      # the embedded default model
    python scripts/demo_screenshot.py --model DIR_OR_HUB_ID --out docs/demo.png

Needs the `dev` extra (gradio, playwright) and /usr/bin/chromium (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT / "examples" / "images"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(process: subprocess.Popen, port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"otter demo exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"otter demo did not listen on port {port} within {timeout}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model directory or Hub id (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "demo.png")
    parser.add_argument("--image", type=Path, default=IMAGES / "blue_square.png")
    parser.add_argument("--question", default="What colour is the shape?")
    parser.add_argument(
        "--example", nargs=2, metavar=("IMAGE", "ANSWER"), default=[str(IMAGES / "red_circle.png"), "red"]
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()

    from PIL import Image
    from playwright.sync_api import sync_playwright

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "otter.cli",
        "demo",
        "--port",
        str(port),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    if args.model:
        command += ["--model", args.model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    try:
        wait_until_listening(server, port)
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                user_data_dir=profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": args.width, "height": args.height},
            )
            context.set_default_timeout(60_000)
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#images input[type=file]").set_input_files(str(args.image))
            page.wait_for_function("document.querySelector('#status').innerText.includes('ready')")
            page.get_by_role("button", name="In-context examples").click()
            page.locator("#example-image-1 input[type=file]").set_input_files(args.example[0])
            page.wait_for_function("document.querySelector('#status').innerText.includes('example ready')")
            page.locator("#example-answer-1 textarea").fill(args.example[1])
            page.get_by_role("button", name="Generation settings").click()
            page.locator("#question textarea").fill(args.question)
            page.locator("#send").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Done.')")
            page.locator("#question textarea").fill("")
            page.locator("#question textarea").blur()
            page.mouse.move(0, 0)
            page.evaluate("window.scrollTo(0, 0)")
            png = page.screenshot(full_page=True)
            context.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height}, {args.out.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
