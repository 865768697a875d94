"""Fast tests of `otter.demo` without a browser: the prompts and inputs it builds, media checks, generation."""

import pytest
import torch
from conftest import REPO_ROOT, TINY_TOKENIZER, tiny_model
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil

from otter import OtterProcessor
from otter.demo import (
    MAX_IMAGES,
    DemoInputError,
    build_inputs,
    generation_kwargs,
    open_image,
    open_video,
    sample_frames,
    stream_answer,
)

RED_CIRCLE = REPO_ROOT / "examples" / "images" / "red_circle.png"
BLUE_SQUARE = REPO_ROOT / "examples" / "images" / "blue_square.png"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def processor():
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return OtterProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(TINY_TOKENIZER))


@pytest.fixture(scope="module")
def red():
    return Image.open(RED_CIRCLE).convert("RGB")


@pytest.fixture(scope="module")
def blue():
    return Image.open(BLUE_SQUARE).convert("RGB")


def test_one_image_is_otters_prompt(processor, red):
    prompt, inputs = build_inputs(processor, "  What colour?  ", [red])
    assert prompt == "<image>User: What colour? GPT:<answer>" == processor.build_prompt("What colour?")
    assert inputs["vision_x"].shape == (1, 1, 1, 3, 32, 32)
    expected = processor(text=prompt, images=[red], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["vision_x"], expected["vision_x"])


def test_several_images_all_come_before_the_question(processor, red, blue):
    prompt, inputs = build_inputs(processor, "Which is red?", [red, blue])
    assert prompt == "<image><image>User: Which is red? GPT:<answer>"
    assert inputs["vision_x"].shape == (1, 2, 1, 3, 32, 32)
    assert torch.equal(inputs["vision_x"][0, 1], processor(text="<image>", images=[blue])["vision_x"][0, 0])


def test_history_follows_the_images(processor, red):
    prompt, inputs = build_inputs(processor, "And the shape?", [red], history=[("What colour?", "red")])
    assert prompt == "<image>User: What colour? GPT:<answer> red<|endofchunk|>User: And the shape? GPT:<answer>"
    # with one image this is exactly the video-style prompt that `otter chat` uses
    assert prompt == processor.build_video_prompt("And the shape?", in_context=[("What colour?", "red")])
    assert inputs["vision_x"].shape == (1, 1, 1, 3, 32, 32)


def test_in_context_examples_go_first_with_their_images(processor, red, blue):
    prompt, inputs = build_inputs(
        processor, "What colour?", [blue], history=[("Is it round?", "no")], examples=[(red, " red ")]
    )
    assert prompt == (
        "<image>User: What colour? GPT:<answer> red<|endofchunk|>"
        "<image>User: Is it round? GPT:<answer> no<|endofchunk|>User: What colour? GPT:<answer>"
    )
    expected = processor(text=prompt, images=[red, blue], return_tensors="pt")
    assert torch.equal(inputs["vision_x"], expected["vision_x"])
    # without history it is what `otter generate --in-context` builds
    prompt, _ = build_inputs(processor, "What colour?", [blue], examples=[(red, "red")])
    assert prompt == processor.build_prompt("What colour?", in_context=[("What colour?", "red")])


def test_video_is_one_image_token_with_frames(processor, red, blue):
    prompt, inputs = build_inputs(processor, "What happens?", frames=[red, blue, red], history=[("Hi?", "hello")])
    assert prompt == processor.build_video_prompt("What happens?", in_context=[("Hi?", "hello")])
    assert inputs["vision_x"].shape == (1, 1, 3, 3, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"question": "   ", "images": ["red"]}, "Type a question"),
        ({"question": "q"}, "Upload an image"),
        ({"question": "q", "images": ["red"], "frames": ["red"]}, "not both"),
        ({"question": "q", "frames": ["red"], "examples": [("red", "a")]}, "cannot be combined with a video"),
        ({"question": "q", "images": ["red"], "examples": [("red", "  ")]}, "needs both an image and its answer"),
        ({"question": "q", "images": ["red"] * (MAX_IMAGES + 1)}, f"At most {MAX_IMAGES} images"),
    ],
)
def test_input_errors_are_user_messages(processor, red, kwargs, message):
    def real(values):
        return [red if value == "red" else value for value in values]

    kwargs = {name: real(value) if isinstance(value, list) else value for name, value in kwargs.items()}
    if "examples" in kwargs:
        kwargs["examples"] = [(red, answer) for _, answer in kwargs["examples"]]
    with pytest.raises(DemoInputError, match=message):
        build_inputs(processor, **kwargs)


def test_non_image_file_names_the_file_not_the_server_path(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(DemoInputError) as error:
        open_image(text_file)
    assert str(error.value).startswith("notes.txt is not an image")
    assert str(tmp_path) not in str(error.value)
    with pytest.raises(DemoInputError, match="clip.mp4 is a video file"):
        open_image(tmp_path / "clip.mp4")


def test_videos_from_animated_gif_or_frames(tmp_path, red, blue):
    gif = tmp_path / "clip.gif"
    frames = [Image.new("RGB", (16, 16), (10 * i, 0, 0)) for i in range(12)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    decoded = open_video([gif], max_frames=4)
    assert len(decoded) == 4 and all(frame.mode == "RGB" for frame in decoded)
    assert [frame.getpixel((0, 0))[0] for frame in decoded] == [0, 40, 70, 110]  # frames 0, 4, 7, 11
    red_path, blue_path = tmp_path / "b.png", tmp_path / "a.png"
    red.save(red_path)
    blue.save(blue_path)
    ordered = open_video([red_path, blue_path], max_frames=8)  # frames in name order
    assert [frame.getpixel((16, 16)) for frame in ordered] == [blue.getpixel((16, 16)), red.getpixel((16, 16))]
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing")
    with pytest.raises(DemoInputError) as error:
        open_video([broken], max_frames=8)
    assert str(error.value).startswith("clip.mp4 is not a readable video (expected a playable .mp4 video")
    assert str(tmp_path) not in str(error.value)
    assert sample_frames(list(range(10)), 3) == [0, 4, 9]
    assert sample_frames(list(range(3)), 8) == [0, 1, 2]


def test_video_files_without_pyav_name_the_extra(tmp_path, monkeypatch):
    import sys

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    monkeypatch.setitem(sys.modules, "av", None)  # as if the `video` extra were not installed
    with pytest.raises(DemoInputError) as error:
        open_video([clip], max_frames=8)
    assert str(error.value).startswith("clip.mp4: .mp4 videos cannot be decoded here")
    assert "pip install 'otter-flamingo[video]'" in str(error.value) and str(tmp_path) not in str(error.value)


def test_generation_settings():
    assert generation_kwargs(16, 1, 0.0, 0.9) == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False}
    assert generation_kwargs(8, 2, 0.7, 0.9) == {
        "max_new_tokens": 8,
        "num_beams": 2,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }


@pytest.mark.parametrize("num_beams", [1, 2])
def test_stream_answer_ends_with_the_models_answer(processor, red, num_beams):
    model = tiny_model("otter", seed=1)
    _, inputs = build_inputs(processor, "What colour?", [red])
    steps = list(stream_answer(model, processor, inputs, **generation_kwargs(6, num_beams, 0.0, 1.0)))
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, num_beams=num_beams, do_sample=False)
    assert steps[-1] == (processor.decode_answer(output[0]), True)
    assert all(not finished for _, finished in steps[:-1])
    if num_beams == 1:
        assert len(steps) > 2  # streamed piece by piece


def test_generation_errors_reach_the_caller(processor, red):
    model = tiny_model("otter", seed=1)
    _, inputs = build_inputs(processor, "What colour?", [red])
    with pytest.raises(ValueError):
        list(stream_answer(model, processor, inputs, max_new_tokens=-3, num_beams=1))


def test_demo_command_errors_are_one_line(capsys):
    from otter.cli import main

    assert main(["demo", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "model not found: /no/such/model" in err and len(err.strip().splitlines()) == 1


def test_build_demo_has_the_parts(processor):
    from otter.demo import build_demo

    demo = build_demo(tiny_model("otter", seed=1), processor, max_new_tokens=8, max_upload_mb=2)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"images", "video", "preview", "chat", "question", "send", "status", "example-image-1"} <= ids


def test_missing_gradio_is_one_line(monkeypatch, capsys):
    import sys

    from otter.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the `demo` extra were not installed
    assert main(["demo", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'otter-flamingo[demo]'" in err and len(err.strip().splitlines()) == 1


def test_the_send_handler_streams_into_the_chat(processor):
    """The Send handler of the page, called as gradio calls it: the chat grows piece by piece, ends with the parsed
    answer, and the history keeps the turn; a bad file gives a status message and no turn."""
    from otter.demo import build_demo

    model = tiny_model("otter", seed=1)
    demo = build_demo(model, processor, max_new_tokens=6)
    respond = next(block_fn.fn for block_fn in demo.fns.values() if getattr(block_fn.fn, "__name__", "") == "respond")
    no_examples = [None] * 2 + [""] * 2
    updates = list(respond("What colour?", [], [], [str(RED_CIRCLE)], None, *no_examples, 6, 1, 0.0, 1.0))
    history, chat, status, _ = updates[-1]
    red = Image.open(RED_CIRCLE).convert("RGB")
    inputs = processor(text="<image>User: What colour? GPT:<answer>", images=[red], return_tensors="pt")
    with torch.no_grad():
        answer = processor.decode_answer(model.generate(**inputs, max_new_tokens=6, do_sample=False)[0])
    assert history == [("What colour?", answer)] and status == "Done."
    assert chat == [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": answer}]
    streamed = [update[1][-1]["content"] for update in updates[1:-1]]
    assert len(streamed) > 2 and all(len(a) <= len(b) for a, b in zip(streamed, streamed[1:], strict=False))

    updates = list(respond("What colour?", [], [], [str(REPO_ROOT / "pyproject.toml")], None, *no_examples, 6, 1, 0, 1))
    assert len(updates) == 1 and updates[0][1] == [] and "pyproject.toml is not an image" in updates[0][2]


def respond_handler(demo):
    """The page's Send handler (`respond`), to call as gradio calls it."""
    return next(block_fn.fn for block_fn in demo.fns.values() if getattr(block_fn.fn, "__name__", "") == "respond")


def test_the_embedded_model_answers_in_the_demo():
    """The page with the embedded default model (what `otter demo` serves without --model) answers questions about
    the bundled examples correctly: a conversation, a new image, in-context examples and a video as frames."""
    import otter
    from otter.demo import build_demo

    model, processor = otter.load_default()
    respond = respond_handler(build_demo(model, processor))
    images = REPO_ROOT / "examples" / "images"
    settings = (16, 1, 0.0, 1.0)

    def ask(question, history, chat, image_files=None, video_files=None, examples=()):
        files = [str(file) for file, _ in examples] + [None] * (2 - len(examples))
        answers = [answer for _, answer in examples] + [""] * (2 - len(examples))
        *_, last = respond(question, history, chat, image_files, video_files, *files, *answers, *settings)
        assert last[2] == "Done.", last[2]
        return last[0], last[1]

    history, chat = ask("What colour is the shape?", [], [], [str(RED_CIRCLE)])
    assert history == [("What colour is the shape?", "red")]
    history, chat = ask("What shape is it?", history, chat, [str(RED_CIRCLE)])
    assert history[-1] == ("What shape is it?", "circle") and len(chat) == 4
    assert ask("What colour is the shape?", [], [], [str(BLUE_SQUARE)])[0][-1][1] == "blue"
    assert ask("How many shapes are there?", [], [], [str(images / "three_shapes.png")])[0][-1][1] == "three"
    examples = [(images / "blue_square.png", "square"), (images / "green_triangle.png", "triangle")]
    in_context = ask("What shape is it?", [], [], [str(images / "yellow_circle.png")], examples=examples)[0]
    assert in_context[-1][1] == "circle"
    frames = sorted(str(path) for path in (REPO_ROOT / "examples" / "frames" / "purple_circle_moving_right").iterdir())
    assert ask("Which way does it move?", [], [], video_files=frames)[0][-1][1] == "right"
    assert ask("What colour is the moving shape?", [], [], video_files=frames)[0][-1][1] == "purple"


def test_the_embedded_model_answers_about_an_mp4_in_the_demo(tmp_path):
    """An MP4 in the video field: checked on upload (its frames in the preview), and answered like its frames."""
    from test_video import seven_frame_clip, write_video

    import otter
    from otter.demo import build_demo

    clip = str(write_video(tmp_path / "clip.mp4", seven_frame_clip()))
    model, processor = otter.load_default()
    demo = build_demo(model, processor)
    on_media_change = next(fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "on_media_change")
    preview, status, *_ = on_media_change(None, [clip])
    assert len(preview) == 4 and status.startswith("Video ready: 4 frame(s)"), status
    settings = (16, 1, 0.0, 1.0)
    for question, expected in (("Which way does it move?", "right"), ("What colour is the moving shape?", "purple")):
        *_, last = respond_handler(demo)(question, [], [], None, [clip], None, None, "", "", *settings)
        assert last[2] == "Done." and last[0] == [(question, expected)], last


def test_demo_command_binds_localhost_and_sets_up_the_queue(monkeypatch, capsys):
    """`otter demo` without --host serves on 127.0.0.1 only (never 0.0.0.0), with no public share link, and queues
    requests: one generation at a time (Send and Enter share the "generate" limit), at most 32 waiting."""
    import gradio

    from otter.cli import main
    from otter.demo import build_parser

    defaults = build_parser().parse_args([])
    assert (defaults.host, defaults.port, defaults.share) == ("127.0.0.1", 7860, False)
    assert (defaults.concurrency, defaults.queue_size) == (1, 32)

    launched = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.append((self, kwargs)))
    assert main(["demo", "--device", "cpu"]) == 0  # the embedded model, every other option left to its default
    demo, kwargs = launched.pop()
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["server_port"] == 7860 and kwargs["share"] is False
    assert kwargs["max_file_size"] == 10 * 1024 * 1024
    assert "serving on http://127.0.0.1:7860" in capsys.readouterr().out
    assert (demo._queue.default_concurrency_limit, demo._queue.max_size) == (1, 32)
    generate = [block_fn for block_fn in demo.fns.values() if getattr(block_fn.fn, "__name__", "") == "respond"]
    assert len(generate) == 2 and {block_fn.concurrency_id for block_fn in generate} == {"generate"}
    assert all(block_fn.queue and block_fn.concurrency_limit == "default" for block_fn in generate)

    argv = ["demo", "--device", "cpu", "--host", "0.0.0.0", "--concurrency", "3", "--queue-size", "5"]
    assert main(argv) == 0
    demo, kwargs = launched.pop()
    assert kwargs["server_name"] == "0.0.0.0"
    assert (demo._queue.default_concurrency_limit, demo._queue.max_size) == (3, 5)
