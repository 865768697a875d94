"""`otter demo`: a gradio web demo of an Otter model.

Upload one or more images (or a video: an MP4 or other video file, an animated GIF / WebP / PNG, or its frames as
images; video files need the `video` extra, which the `demo` extra includes), optionally
in-context examples (an image with the answer to the same question), and chat: answers stream in token by token,
and earlier turns stay in the prompt. Requests from several browsers wait in a queue.

    otter demo                                  # the embedded default model, on http://127.0.0.1:7860
    otter demo --model path/or/hub-id --port 8000 --max-upload-mb 5

Prompts (the same as `otter generate` and `otter chat`):

- images, no history: `[<image>User: {q} GPT:<answer> {a_i}<|endofchunk|>]... <image>*N User: {q} GPT:<answer>`,
  in-context examples first (each with its image and the answer to the current question), then every uploaded
  image, then the question;
- later turns keep the conversation after the images: `... <image>*N User: {q1} GPT:<answer> {a1}<|endofchunk|>
  User: {q} GPT:<answer>` (with one image this is Otter's video-style prompt, as in `otter chat`);
- a video: `<image>` once for the clip (its frames, resampled evenly to the model's `max_num_frames`, go along F of
  `vision_x`), then the turns.

gradio is imported only when the app is built, with its analytics and version check turned off, so that nothing
reaches the internet (unless `--share` is asked for, which opens a public gradio tunnel).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers.utils import logging

from otter.default import model_display_name
from otter.video import (
    VIDEO_EXTRA_HINT,
    VideoDecodeError,
    VideoDecoderMissing,
    is_video_file,
    load_video_frames,
    sample_indices,
    video_decoder_available,
)

logger = logging.get_logger(__name__)

IMAGE_HINT = "PNG, JPEG, GIF, BMP, WebP or TIFF"
MAX_IMAGES = 8  # uploaded query images per question
NUM_EXAMPLES = 2  # in-context example rows in the page
DEFAULT_MAX_FRAMES = 16  # when the model's config has no max_num_frames


class DemoInputError(ValueError):
    """A problem with what the user gave in the page, shown to them as one line."""


# ----- media ---------------------------------------------------------------------------------------------------------


def _paths(files) -> list[Path]:
    """gradio's File value (None, a path, or a list of paths) as a list of paths."""
    if files is None:
        return []
    if isinstance(files, str | os.PathLike):
        return [Path(files)]
    return [Path(getattr(file, "name", file)) for file in files]


def open_image(path: Path):
    """One RGB image, or a `DemoInputError` that names the file and says what to upload instead."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if is_video_file(path):
        raise DemoInputError(
            f"{path.name} is a video file, not an image. Upload {IMAGE_HINT} files (and videos as videos)."
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise DemoInputError(
            f"{path.name} is not an image ({_short(error, path)}). Upload {IMAGE_HINT} files."
        ) from error


def open_video(paths: Sequence[Path], max_frames: int) -> list:
    """The frames of a video: one video file (MP4, WebM, ...), one animated GIF / WebP / PNG file, or several image
    files (frames in name order), resampled evenly to at most `max_frames`."""
    paths = [Path(path) for path in paths]
    if not paths:
        return []
    if len(paths) > 1:
        return sample_frames([open_image(path) for path in sorted(paths, key=lambda p: p.name)], max_frames)
    path = paths[0]
    try:
        return load_video_frames(path, max_frames)
    except VideoDecoderMissing as error:
        raise DemoInputError(
            f"{path.name}: {path.suffix} videos cannot be decoded here: the server needs PyAV "
            f"({VIDEO_EXTRA_HINT}). Upload the clip as an animated GIF, or its frames as several images."
        ) from error
    except VideoDecodeError as error:
        upload = (
            "a video file" if is_video_file(path) else f"a video file, an animated GIF, or frames as {IMAGE_HINT} files"
        )
        raise DemoInputError(
            f"{path.name} is not a readable video (expected {error.expected}; {error.reason}). Upload {upload}."
        ) from error
    except FileNotFoundError as error:
        raise DemoInputError(f"{path.name}: the upload was not found on the server; upload it again.") from error


def sample_frames(frames: list, limit: int) -> list:
    """`limit` frames spread evenly over the clip (first and last included), or all of them when there are fewer."""
    return [frames[index] for index in sample_indices(len(frames), limit)]


def _short(error: BaseException, path: Path | None = None) -> str:
    """The first line of an error's message, without the (server-side, temporary) path of the file."""
    text = str(error).strip().splitlines()
    text = text[0] if text else type(error).__name__
    if path is not None:
        text = text.replace(f" '{path}'", "").replace(f" {path}", "").replace(str(path), path.name)
    return text


# ----- prompts -------------------------------------------------------------------------------------------------------


def build_inputs(
    processor,
    question: str,
    images: Sequence = (),
    frames: Sequence | None = None,
    history: Sequence[tuple[str, str]] = (),
    examples: Sequence[tuple[object, str]] = (),
):
    """The prompt and the processor's inputs for one question.

    Args:
        processor: an [`OtterProcessor`].
        question: the user's new question.
        images: the images the conversation is about (each gets an `<image>`, all before the first question).
        frames: instead of images, the frames of one video (one `<image>` for the clip).
        history: earlier `(question, answer)` turns of this conversation, oldest first.
        examples: in-context `(image, answer)` pairs; each shows the model an image and the answer to `question`.

    Returns:
        `(prompt, inputs)`, `inputs` being the processor's `BatchFeature` (PyTorch tensors, batch of one).

    Raises:
        DemoInputError: an empty question, no media, or media that cannot go together.
    """
    question = (question or "").strip()
    if not question:
        raise DemoInputError("Type a question first.")
    images = list(images)
    frames = list(frames) if frames is not None else []
    examples = [(image, str(answer).strip()) for image, answer in examples]
    if any(not answer for _, answer in examples):
        raise DemoInputError("Every in-context example needs both an image and its answer.")
    if images and frames:
        raise DemoInputError("Give images or a video, not both: the model takes one kind of media per prompt.")
    if not images and not frames:
        raise DemoInputError("Upload an image (or a video / its frames) first.")
    if len(images) > MAX_IMAGES:
        raise DemoInputError(f"At most {MAX_IMAGES} images per question; {len(images)} were uploaded.")
    media = processor.media_token
    # build_video_prompt is `<image>` + the earlier turns + the question: the part after the media is shared by both.
    turns = processor.build_video_prompt(question, in_context=list(history))[len(media) :]
    if frames:
        if examples:
            raise DemoInputError("In-context examples are images; they cannot be combined with a video.")
        prompt = media + turns
        return prompt, processor(text=prompt, videos=[frames], return_tensors="pt")
    head = processor.build_prompt(question, in_context=[(question, answer) for _, answer in examples])
    head = head.rpartition(media)[0]  # the examples, each `<image>User: {question} GPT:<answer> {a}<|endofchunk|>`
    prompt = head + media * len(images) + turns
    all_images = [image for image, _ in examples] + images
    return prompt, processor(text=prompt, images=all_images, return_tensors="pt")


def generation_kwargs(max_new_tokens: int, num_beams: int, temperature: float, top_p: float) -> dict:
    """`generate` arguments from the page's settings: temperature 0 means greedy (or beam) search."""
    kwargs = {"max_new_tokens": int(max_new_tokens), "num_beams": max(1, int(num_beams))}
    if temperature and float(temperature) > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs["do_sample"] = False
    return kwargs


def stream_answer(model, processor, inputs, **kwargs) -> Iterator[tuple[str, bool]]:
    """Generate, yielding `(text so far, finished)`. Greedy and sampled decoding stream token by token through a
    `TextIteratorStreamer` (generation runs in a thread); beam search yields once. The last yield is the parsed
    answer (`decode_answer`: the text after `<answer>`, cut at `<|endofchunk|>`)."""
    import torch
    from transformers import TextIteratorStreamer

    inputs = inputs.to(model.device)
    if "vision_x" in inputs and inputs["vision_x"].is_floating_point():
        inputs["vision_x"] = inputs["vision_x"].to(model.dtype)
    if kwargs.get("num_beams", 1) > 1:  # transformers' streamers do not support beam search
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
        yield processor.decode_answer(output[0]), True
        return

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def work():
        try:
            with torch.inference_mode():
                result["output"] = model.generate(**inputs, streamer=streamer, **kwargs)
        except BaseException as error:  # handed to the caller's thread; the streamer must still end
            result["error"] = error
            streamer.end()

    worker = threading.Thread(target=work, name="otter-demo-generate", daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text, False
    worker.join()
    if "error" in result:
        raise result["error"]
    yield processor.decode_answer(result["output"][0]), True


# ----- the app -------------------------------------------------------------------------------------------------------


def import_gradio():
    """gradio, with its analytics and version check off (they call home). A clear error when it is missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    try:
        import gradio
    except ModuleNotFoundError as error:
        from otter.cli import UsageError

        raise UsageError(f"the demo needs gradio: pip install 'otter-flamingo[demo]' ({error})") from error
    return gradio


def _error(message: str) -> str:
    return f"**Error:** {message}"


def build_demo(model, processor, max_new_tokens: int = 64, max_upload_mb: float | None = None, title: str = "Otter"):
    """The gradio app (not launched): call `.queue(...)` and `.launch(max_file_size=...)` on it, as `main` does.
    `max_upload_mb` is only shown in the page; the limit itself is `launch`'s `max_file_size`."""
    gr = import_gradio()
    max_frames = getattr(model.config, "max_num_frames", None) or DEFAULT_MAX_FRAMES
    size_hint = f", {max_upload_mb:g} MB each" if max_upload_mb else ""
    model_name = model_display_name(getattr(model.config, "_name_or_path", "") or "") or type(model).__name__
    if video_decoder_available():
        video_hint = "Videos: MP4, WebM, MOV, AVI, MKV, ..., an animated GIF, or the frames as several images. "
    else:
        video_hint = (
            f"Videos: an animated GIF, or the frames as several images (MP4 and other video files need "
            f"`{VIDEO_EXTRA_HINT}` on the server). "
        )
    video_hint += f"Videos are resampled to {max_frames} frames."

    def read_media(image_files, video_files) -> tuple[list, list]:
        images = [open_image(path) for path in _paths(image_files)]
        frames = open_video(_paths(video_files), max_frames)
        return images, frames

    def on_media_change(image_files, video_files):
        """Check the uploads as soon as they arrive; new media start a new conversation."""
        try:
            images, frames = read_media(image_files, video_files)
        except DemoInputError as error:
            return [], _error(str(error)), [], []
        if images and frames:
            status = _error("Give images or a video, not both: remove one of them.")
        elif len(images) > MAX_IMAGES:
            status = _error(f"At most {MAX_IMAGES} images per question; {len(images)} were uploaded.")
        elif images:
            status = f"{len(images)} image(s) ready. Ask a question."
        elif frames:
            status = f"Video ready: {len(frames)} frame(s) (at most {max_frames} are used). Ask a question."
        else:
            status = "Upload an image (or a video / its frames), then ask a question."
        return images + frames, status, [], []

    def on_example_change(example_file):
        if example_file is None:
            return ""
        try:
            open_image(Path(example_file))
        except DemoInputError as error:
            return _error(f"in-context example: {error}")
        return "In-context example ready."

    def respond(question, history, chat, image_files, video_files, *rest):
        example_files, example_answers = rest[:NUM_EXAMPLES], rest[NUM_EXAMPLES : 2 * NUM_EXAMPLES]
        settings = rest[2 * NUM_EXAMPLES :]
        history, chat = list(history or []), list(chat or [])
        try:
            images, frames = read_media(image_files, video_files)
            examples = []
            for index, (file, answer) in enumerate(zip(example_files, example_answers, strict=True), start=1):
                if file is None and not (answer or "").strip():
                    continue
                if file is None:
                    raise DemoInputError(f"In-context example {index} has an answer but no image.")
                examples.append((open_image(Path(file)), answer or ""))
            prompt, inputs = build_inputs(processor, question, images, frames or None, history, examples)
        except DemoInputError as error:
            yield history, chat, _error(str(error)), gr.update()
            return
        question = question.strip()
        logger.info(f"demo prompt: {prompt!r}")
        chat = [*chat, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield history, chat, "Generating...", ""
        try:
            for text, finished in stream_answer(model, processor, inputs, **generation_kwargs(*settings)):
                chat[-1] = {"role": "assistant", "content": text if text or not finished else "(empty answer)"}
                if finished:
                    history.append((question, text))
                    yield history, chat, "Done.", gr.update()
                else:
                    yield history, chat, "Generating...", gr.update()
        except Exception as error:  # shown in the page as one line; the traceback goes to the server's log
            logger.error(f"demo generation failed: {error!r}", exc_info=True)
            chat[-1] = {"role": "assistant", "content": "(no answer)"}
            yield history, chat, _error(f"generation failed: {_short(error)}"), gr.update()

    def clear_chat():
        return [], [], "Conversation cleared."

    with gr.Blocks(title=f"{title} demo", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nModel: **{model_name}**. Upload images (or a video), add in-context examples if you like, and "
            "chat about them. Answers stream in as they are generated; other users' requests wait in a queue."
        )
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image_files = gr.File(
                    file_count="multiple",
                    label=f"Images (up to {MAX_IMAGES}{size_hint})",
                    elem_id="images",
                )
                video_files = gr.File(
                    file_count="multiple",
                    label="Video: a video file (MP4, WebM, MOV, ...), an animated GIF / WebP / PNG, or its frames",
                    elem_id="video",
                )
                gr.Markdown(f"Images: {IMAGE_HINT}. {video_hint}")
                preview = gr.Gallery(
                    label="Media",
                    columns=4,
                    height=140,
                    object_fit="contain",
                    preview=False,
                    fit_columns=False,
                    interactive=False,
                    elem_id="preview",
                )
                with gr.Accordion("In-context examples", open=False):
                    gr.Markdown("Each example shows the model an image and the answer to the same question.")
                    example_files, example_answers = [], []
                    for index in range(1, NUM_EXAMPLES + 1):
                        example_files.append(gr.File(label=f"Example image {index}", elem_id=f"example-image-{index}"))
                        example_answers.append(gr.Textbox(label=f"Answer {index}", elem_id=f"example-answer-{index}"))
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=360, render_markdown=False, elem_id="chat")
                question = gr.Textbox(
                    label="Question", placeholder="What is in the image?", lines=1, elem_id="question"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear conversation", elem_id="clear")
                status = gr.Markdown(
                    "Upload an image (or a video / its frames), then ask a question.", elem_id="status"
                )
                with gr.Accordion("Generation settings", open=False):
                    max_tokens = gr.Slider(1, 512, value=max_new_tokens, step=1, label="Max new tokens")
                    num_beams = gr.Slider(1, 8, value=1, step=1, label="Beams (more than 1: no streaming)")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when sampling)")

        for media in (image_files, video_files):
            media.change(on_media_change, [image_files, video_files], [preview, status, chatbot, history])
        for example_file in example_files:
            example_file.change(on_example_change, [example_file], [status])
        inputs = [question, history, chatbot, image_files, video_files, *example_files, *example_answers]
        inputs += [max_tokens, num_beams, temperature, top_p]
        outputs = [history, chatbot, status, question]
        send.click(respond, inputs, outputs, concurrency_id="generate")
        question.submit(respond, inputs, outputs, concurrency_id="generate")
        clear.click(clear_chat, None, [history, chatbot, status])
        chatbot.clear(clear_chat, None, [history, chatbot, status])  # the chat's own trash button
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otter demo", description="The gradio web demo of an Otter model.")
    parser.add_argument("--model", help="HF model directory or Hub id (default: the embedded model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload, in MB")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the page's initial max new tokens")
    parser.add_argument("--concurrency", type=int, default=1, help="generations that run at once (others queue)")
    parser.add_argument("--queue-size", type=int, default=32, help="requests that may wait in the queue")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from otter.cli import UsageError, load_model

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.max_upload_mb <= 0:
            raise UsageError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
        if importlib.util.find_spec("gradio") is None:  # say so before loading a model
            import_gradio()
        model, processor = load_model(args.model, args.device)
        demo = build_demo(model, processor, max_new_tokens=args.max_new_tokens, max_upload_mb=args.max_upload_mb)
    except UsageError as error:
        if args.debug:
            raise
        print(f"otter demo: error: {error}", file=sys.stderr)
        return 2
    demo.queue(max_size=args.queue_size, default_concurrency_limit=max(1, args.concurrency))
    print(f"otter demo: serving on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=int(args.max_upload_mb * 1024 * 1024),
        ssr_mode=False,
        show_error=False,
        quiet=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
