import threading

import pytest
import torch
from conftest import REPO_ROOT, TINY_TOKENIZER, tiny_model
from transformers import AutoTokenizer, CLIPImageProcessorPil

from otter import OtterProcessor
from otter.cli import main

RED_CIRCLE = REPO_ROOT / "examples" / "images" / "red_circle.png"
BLUE_SQUARE = REPO_ROOT / "examples" / "images" / "blue_square.png"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("otter-tiny")
    model = tiny_model("otter", seed=21)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = OtterProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(TINY_TOKENIZER))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def expected_answer(model_dir, prompt, images, max_new_tokens=6, streamed=False):
    """What the CLI should print: the parsed answer, or (with `streamed`) the new text as a streamer shows it."""
    from otter import OtterForConditionalGeneration

    model = OtterForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = OtterProcessor.from_pretrained(model_dir)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1)
    if streamed:
        return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return processor.decode_answer(output[0])


def test_generate_prints_the_models_answer(model_dir, capsys):
    from PIL import Image

    status = main(["generate", "--model", str(model_dir), "--image", str(RED_CIRCLE), "--prompt", "What colour?"])
    assert status == 0
    printed = capsys.readouterr().out.strip()
    prompt = "<image>User: What colour? GPT:<answer>"
    assert printed == expected_answer(model_dir, prompt, [Image.open(RED_CIRCLE).convert("RGB")], max_new_tokens=64)


@pytest.fixture(scope="module")
def tokenizer_only_dir(model_dir, tmp_path_factory):
    """`model_dir` as the 2023 releases ship: config, weights and tokenizer, no processor or image-processor config."""
    directory = tmp_path_factory.mktemp("published-style")
    for path in model_dir.iterdir():
        if path.name not in {"processor_config.json", "preprocessor_config.json"}:
            (directory / path.name).write_bytes(path.read_bytes())
    return directory


def test_generate_on_a_tokenizer_only_release(model_dir, tokenizer_only_dir, capsys):
    from otter.default import load_processor

    processor = load_processor(tokenizer_only_dir)
    assert isinstance(processor, OtterProcessor)
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}  # the config's vision image size
    argv = ["--image", str(RED_CIRCLE), "--prompt", "What colour?", "--max-new-tokens", "8"]
    assert main(["generate", "--model", str(tokenizer_only_dir), *argv]) == 0
    built = capsys.readouterr().out
    assert main(["generate", "--model", str(model_dir), *argv]) == 0
    assert built == capsys.readouterr().out


def test_tokenizer_ids_that_disagree_with_the_config_are_refused(tokenizer_only_dir, tmp_path, capsys):
    import json

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tokenizer_only_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["media_token_id"] = config["endofchunk_token_id"]
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(broken), "--image", str(RED_CIRCLE), "--prompt", "q"]) == 2
    # stderr also carries transformers' weight-loading progress bar; the error itself is one line.
    error = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(error) == 1 and error[0].startswith("otter generate: error: ") and "special token ids" in error[0]


def test_generate_with_in_context_example_and_stream(model_dir, capsys):
    from PIL import Image

    args = ["generate", "--model", str(model_dir), "--image", str(BLUE_SQUARE), "--prompt", "What colour?"]
    args += ["--in-context", str(RED_CIRCLE), "red", "--stream", "--max-new-tokens", "6"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    prompt = "<image>User: What colour? GPT:<answer> red<|endofchunk|><image>User: What colour? GPT:<answer>"
    images = [Image.open(path).convert("RGB") for path in (RED_CIRCLE, BLUE_SQUARE)]
    assert streamed.strip() == expected_answer(model_dir, prompt, images, streamed=True).strip()


def test_generate_on_frames(model_dir, tmp_path, capsys):
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, path in enumerate([RED_CIRCLE, BLUE_SQUARE, RED_CIRCLE]):
        Image.open(path).save(frames / f"{i:03d}.png")
    args = ["generate", "--model", str(model_dir), "--frames", str(frames), "--prompt", "What happens?"]
    assert main([*args, "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png", "--prompt", "q"], "image not found: missing.png"),
        (["--image", str(RED_CIRCLE), "--prompt", "   "], "the prompt is empty"),
        (["--image", str(RED_CIRCLE), "--prompt", "q", "--model", "/no/such/model"], "model not found: /no/such/model"),
        (["--image", str(REPO_ROOT / "pyproject.toml"), "--prompt", "q"], "not a readable image"),
        (["--video", "missing.gif", "--prompt", "q"], "video not found: missing.gif"),
        (["--video", str(REPO_ROOT / "pyproject.toml"), "--prompt", "q"], "not a readable video"),
    ],
)
def test_user_errors_are_one_line_with_status_2(args, message, capsys, tmp_path):
    status = main(["generate", *args])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_corrupt_video_file_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A broken MP4 (random bytes) is reported in one line, exit 2, before the (slow) model load."""
    import numpy as np

    pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8)))

    def no_model(*args):
        raise AssertionError("the model was loaded before the video was checked")

    monkeypatch.setattr("otter.cli.load_model", no_model)
    assert main(["generate", "--video", str(clip), "--prompt", "Which way does it move?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"otter generate: error: not a readable video: {clip} (expected a playable .mp4 video")


def test_generate_on_an_mp4_matches_its_frames(model_dir, tmp_path, capsys):
    """`--video clip.mp4` gives the model the decoded frames, as `--frames DIR` of the same frames does (the frames
    are the decoded ones, so the answers are equal whatever the codec loses)."""
    from test_video import write_video

    from otter.video import load_video_frames

    clip = write_video(tmp_path / "clip.mp4", [load_image_rgb(path) for path in (RED_CIRCLE, BLUE_SQUARE, RED_CIRCLE)])
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(load_video_frames(clip, None)):
        frame.save(frames / f"{i:03d}.png")
    answers = []
    for media in (["--video", str(clip)], ["--frames", str(frames)]):
        args = ["generate", "--model", str(model_dir), *media, "--prompt", "What happens?", "--max-new-tokens", "4"]
        assert main(args) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_bad_model_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    status = main(["generate", "--model", str(tmp_path), "--image", str(RED_CIRCLE), "--prompt", "q"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "cannot load model" in err


def test_debug_shows_the_traceback():
    from otter.cli import UsageError

    with pytest.raises(UsageError, match="image not found"):
        main(["--debug", "generate", "--image", "missing.png", "--prompt", "q"])


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "--checkpoint", "missing.pt", "--config", "configs/otter-tiny.json", "--output", "out"],
        ["estimate", "--config", "missing.json"],
        ["eval", "--model", "/no/such/model"],
        ["train", "--model", "/no/such/model", "--mimicit-yaml", "data.yaml", "--output-dir", "out"],
    ],
    ids=["convert", "estimate", "eval", "train"],
)
def test_debug_reaches_delegated_commands(command, tmp_path, monkeypatch, capsys):
    """Without --debug a delegated command prints one line and exits 2; `otter --debug CMD` raises instead."""
    monkeypatch.chdir(tmp_path)
    command = [str(REPO_ROOT / arg) if arg.startswith("configs/") else arg for arg in command]
    assert main(command) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises((Exception, SystemExit)) as raised:
        main(["--debug", *command])
    assert not isinstance(raised.value, SystemExit), "--debug should show the traceback, not exit"


def test_chat_keeps_the_history(model_dir, monkeypatch, capsys):
    answers = iter(["What colour?", "And the shape?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--model", str(model_dir), "--image", str(RED_CIRCLE), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("otter> ") == 2


def within(seconds, function, *args):
    """`function(*args)` in a thread: a hang fails the test after `seconds` instead of blocking the suite."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds}s: hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_stream_with_beam_search_is_refused_in_one_line(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--image", str(RED_CIRCLE), "--prompt", "q", "--stream"]
    assert within(120, main, [*args, "--num-beams", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "otter generate: error: --stream needs --num-beams 1 (beam search cannot stream its tokens)"


def test_an_error_in_the_streaming_thread_reaches_the_caller(model_dir):
    """transformers refuses a streamer with beam search inside the generate thread: the caller must get that
    error, not wait forever for tokens."""
    import argparse

    from otter.cli import generate_answer, load_model

    model, processor = load_model(str(model_dir), "cpu")
    inputs = processor(text="<image>User: q GPT:<answer>", images=[load_image_rgb(RED_CIRCLE)], return_tensors="pt")
    args = argparse.Namespace(max_new_tokens=3, num_beams=2, stream=True)
    with pytest.raises(ValueError, match="beam search"):
        within(120, generate_answer, model, processor, inputs, args)


def load_image_rgb(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_generate_with_beam_search(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--image", str(RED_CIRCLE), "--prompt", "q", "--num-beams", "2"]
    assert within(120, main, [*args, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_chat_with_beam_search_prints_whole_answers(model_dir, monkeypatch, capsys):
    answers = iter(["What colour?", "And the shape?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    argv = ["chat", "--model", str(model_dir), "--image", str(RED_CIRCLE), "--max-new-tokens", "3", "--num-beams", "2"]
    assert within(120, main, argv) == 0
    assert capsys.readouterr().out.count("otter> ") == 2


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-new-tokens", "0", "must be at least 1, got 0"),
        ("--num-beams", "0", "must be at least 1, got 0"),
        ("--num-beams", "-3", "must be at least 1, got -3"),
        ("--max-new-tokens", "many", "expected a positive integer, got 'many'"),
    ],
)
def test_counts_must_be_positive(command, option, value, message, capsys):
    question = ["--prompt", "q"] if command == "generate" else []
    with pytest.raises(SystemExit) as exited:
        main([command, "--image", str(RED_CIRCLE), *question, option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err and "Traceback" not in err


def test_a_device_this_machine_lacks_is_one_line(model_dir, capsys):
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    argv = ["generate", "--model", str(model_dir), "--image", str(RED_CIRCLE), "--prompt", "q", "--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"otter generate: error: device '{device}' is not available")
    assert len(err.strip().splitlines()) == 1
    assert main([*argv[:-1], "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("otter generate: error: invalid device 'gpu'") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "train", "eval", "estimate", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: otter {command}")
