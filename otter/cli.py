"""The `otter` command: `generate`, `chat`, and the entry points of the other tools (`convert`, `train`,
`estimate`, `eval`, `demo`).

Errors a user can fix (a missing file, an unreadable image, a bad model path, an empty prompt) print one line
and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

USAGE_ERROR = 2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Subcommands whose parser and work live in their own module, as `main(argv) -> int`.
DELEGATED = {
    "convert": ("otter.convert", "convert a training checkpoint or published weights to an HF model"),
    "train": ("otter.train", "instruction-tune on MIMIC-IT data with accelerate"),
    "estimate": ("otter.memory", "estimate the memory a config needs and whether it fits your devices"),
    "eval": ("otter.evaluate", "score a model on a MIMIC-IT style question set"),
    "demo": ("otter.demo", "the gradio web demo (needs the `demo` extra)"),
}
# Delegated commands that print one-line errors unless given --debug: `otter --debug CMD` passes it on.
DEBUG_FLAG_COMMANDS = {"convert", "train", "estimate", "eval", "demo"}


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otter", description="Otter and OpenFlamingo on transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--model", help="HF model directory or Hub id (default: the embedded model)")
        command.add_argument("--max-new-tokens", type=positive_int, default=64)
        command.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (1: greedy)")
        command.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    generate = commands.add_parser("generate", help="answer a question about images, a video or frames")
    media = generate.add_mutually_exclusive_group()
    media.add_argument("--image", nargs="+", action="extend", default=[], type=Path, help="image file(s)")
    media.add_argument(
        "--video",
        type=Path,
        help="a video: MP4, WebM, MOV, AVI, MKV, ... (needs the `video` extra) or an animated GIF, WebP or PNG",
    )
    media.add_argument("--frames", type=Path, help="a directory of video frames (sorted by name)")
    generate.add_argument("--prompt", required=True, help="the question")
    generate.add_argument(
        "--in-context",
        nargs=2,
        action="append",
        default=[],
        metavar=("IMAGE", "ANSWER"),
        help="an example image and its answer to the same question (repeatable)",
    )
    generate.add_argument(
        "--stream", action="store_true", help="print tokens as they are generated (needs --num-beams 1)"
    )
    model_options(generate)

    chat = commands.add_parser(
        "chat", help="an interactive multi-turn conversation about an image (streamed unless --num-beams > 1)"
    )
    chat.add_argument("--image", type=Path, required=True)
    model_options(chat)

    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


# ----- inputs ------------------------------------------------------------------------------------------------------


def load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"not a readable image: {path} ({error})") from error


def load_frames(directory: Path) -> list:
    if not directory.is_dir():
        raise UsageError(f"frames directory not found: {directory}")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no image files in frames directory: {directory}")
    return [load_image(p) for p in files]


def check_video(path: Path) -> None:
    """A quick look at a --video file before the model loads: it exists, and opens as a video."""
    from otter.video import check_video as check

    with video_errors(path):
        check(path)


def load_video(path: Path, max_frames: int | None) -> list:
    """The frames of a video file or an animated GIF / WebP / PNG (a still image is a one-frame video), resampled
    evenly (first and last frame kept) to at most `max_frames`, as in training."""
    from otter.video import load_video_frames

    with video_errors(path):
        return load_video_frames(path, max_frames)


@contextlib.contextmanager
def video_errors(path: Path):
    """`otter.video`'s errors as one-line usage errors."""
    from otter.video import VideoDecodeError, VideoDecoderMissing

    try:
        yield
    except FileNotFoundError as error:
        raise UsageError(f"video not found: {path}") from error
    except VideoDecoderMissing as error:
        raise UsageError(f"{error}, or pass an animated GIF, or the frames with --frames DIR") from error
    except VideoDecodeError as error:
        raise UsageError(f"{error}; or pass its frames with --frames DIR") from error


def load_model(model_path: str | None, device: str | None):
    """The model and its processor, from a directory, a Hub id, or the embedded default model."""
    import torch
    from transformers import AutoModelForImageTextToText

    import flamingo  # noqa: F401  (registers the Flamingo classes with the Auto factories)
    import otter  # noqa: F401
    from otter.default import load_processor

    device = check_device(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if model_path is None:
        model_path = default_model_path()
    elif is_missing_model(model_path):
        raise UsageError(f"model not found: {model_path} (expected an HF model directory or a Hub id)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = load_processor(model_path, model.config)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load model from {model_path}: {first_line}") from error
    return model.to(device).eval(), processor


def check_device(name: str) -> str:
    """`name` if it is a device torch knows and this machine has (`cuda`, `cuda:1`, `mps`, `cpu`, ...)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"invalid device {name!r} (expected cpu, cuda, cuda:N, mps, ...)") from error
    if device.type in ("cpu", "meta"):
        return name
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is not None and not is_available():
        raise UsageError(f"device {name!r} is not available on this machine (try --device cpu)")
    device_count = getattr(backend, "device_count", None)
    if device.index is not None and device_count is not None and device.index >= device_count():
        raise UsageError(f"device {name!r} is not available: this machine has {device_count()} {device.type} device(s)")
    return name


def is_missing_model(name_or_path: str) -> bool:
    """A path that does not exist and cannot be a Hub id (`owner/name`, when the Hub may be used)."""
    if Path(name_or_path).exists():
        return False
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name_or_path) is not None
    return not hub_id or os.environ.get("HF_HUB_OFFLINE") == "1"


def default_model_path() -> str:
    from otter.default import default_model_path as embedded_model_path

    try:
        return str(embedded_model_path())
    except FileNotFoundError as error:
        raise UsageError(f"{error}, or pass --model DIR_OR_HUB_ID") from error


# ----- commands ----------------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    question = args.prompt.strip()
    if not question:
        raise UsageError("the prompt is empty: pass a question with --prompt")
    if args.stream and args.num_beams > 1:
        raise UsageError("--stream needs --num-beams 1 (beam search cannot stream its tokens)")
    examples = [(load_image(Path(image)), answer) for image, answer in args.in_context]
    is_video = args.frames is not None or args.video is not None
    if is_video:
        if examples:
            raise UsageError("--in-context examples are images; they cannot be combined with --video or --frames")
        # A frames directory is read now; a video file is only checked now (before the slow model load), and
        # decoded once the model says how many frames it takes.
        frames = load_frames(args.frames) if args.frames is not None else None
        if frames is None:
            check_video(args.video)
    else:
        if not args.image:
            raise UsageError(
                "give the image(s) to ask about with --image PATH..., a video with --video PATH, "
                "or video frames with --frames DIR"
            )
        images = [load_image(path) for path in args.image]
    model, processor = load_model(args.model, args.device)

    if is_video:
        from otter.data.dataset import resample_frames

        # As in training: a longer clip is resampled evenly (first and last frame kept) to the frames the model has.
        if frames is None:
            frames = load_video(args.video, model.config.max_num_frames)
        frames = list(resample_frames(tuple(frames), model.config.max_num_frames))
        prompt = processor.build_video_prompt(question)
        inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
    else:
        # In-context examples first (each with its image), then the question. Several --image files all go
        # before the question, so it follows the last of them (with attend-previous, text sees its latest image).
        prompt = processor.build_prompt(question, in_context=[(question, answer) for _, answer in examples])
        head, _, query = prompt.rpartition(processor.media_token)
        prompt = head + processor.media_token * len(images) + query
        inputs = processor(text=prompt, images=[image for image, _ in examples] + images, return_tensors="pt")
    answer = generate_answer(model, processor, inputs, args)
    if not args.stream:
        print(answer)
    return 0


def generate_answer(model, processor, inputs, args: argparse.Namespace) -> str:
    """The parsed answer; with `args.stream`, its tokens are printed as they come (greedy or sampling only)."""
    inputs = inputs.to(model.device)
    kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if not getattr(args, "stream", False):
        output = model.generate(**inputs, **kwargs)
        return processor.decode_answer(output[0])
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def work() -> None:
        try:
            result["output"] = model.generate(**inputs, streamer=streamer, **kwargs)
        except BaseException as error:  # re-raised in the main thread, which must stop waiting for tokens
            result["error"] = error
            streamer.text_queue.put(streamer.stop_signal)

    # A daemon thread: an interrupted (Ctrl-C) run exits without waiting for the generation to finish.
    worker = threading.Thread(target=work, name="otter-generate", daemon=True)
    worker.start()
    for piece in streamer:
        print(piece, end="", flush=True)
    worker.join()
    print()
    if "error" in result:
        raise result["error"]
    return processor.decode_answer(result["output"][0])


def run_chat(args: argparse.Namespace) -> int:
    image = load_image(args.image)
    model, processor = load_model(args.model, args.device)
    history: list[tuple[str, str]] = []
    print(f"Chatting about {args.image.name}. Empty line or Ctrl-D to quit.")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not question:
            return 0
        # One image, several turns: the video-style prompt (one <image>, then the turns) keeps the history.
        prompt = processor.build_video_prompt(question, in_context=history)
        inputs = processor(text=prompt, images=[image], return_tensors="pt")
        print("otter> ", end="", flush=True)
        # Streamed as it is generated, except with beam search (which cannot stream): then printed when done.
        stream = args.num_beams == 1
        answer = generate_answer(model, processor, inputs, argparse.Namespace(**vars(args), stream=stream))
        if not stream:
            print(answer)
        history.append((question, answer))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    debug = args.debug
    try:
        if args.command in DELEGATED:
            module_name = DELEGATED[args.command][0]
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                raise UsageError(f"`otter {args.command}` is not available: {error}") from error
            if debug and args.command in DEBUG_FLAG_COMMANDS and "--debug" not in rest:
                rest.append("--debug")  # `otter --debug eval ...` means `otter eval --debug ...`
            return int(module.main(rest) or 0)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_generate(args) if args.command == "generate" else run_chat(args)
    except UsageError as error:
        if debug:
            raise
        print(f"otter {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
