"""The embedded default model `otter-tiny-shapes`: loading, the model card, `otter generate` on held-out shapes
questions and on the bundled examples, and `otter eval`."""

import json
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import REPO_ROOT
from transformers import AutoModelForImageTextToText, AutoProcessor

import otter
from otter import OtterForConditionalGeneration, OtterProcessor
from otter.cli import main as cli_main
from otter.data import TaskType, load_mixture_yaml
from otter.evaluate import load_question_set, make_shapes_eval_set, normalize_answer

# Neither the training images (seed 0) nor the model card's held-out questions (seed 1234).
TEST_SEED = 4321
EXAMPLES = REPO_ROOT / "examples"
# Bundled examples and their answers: (images, frames directory, question, answer).
BUNDLED = [
    *[
        (EXAMPLES / "images" / f"{colour}_{shape}.png", question, answer)
        for colour, shape in [
            ("red", "circle"),
            ("blue", "square"),
            ("green", "triangle"),
            ("yellow", "circle"),
            ("purple", "square"),
            ("orange", "triangle"),
        ]
        for question, answer in [("What colour is the shape?", colour), ("What shape is it?", shape)]
    ],
    (EXAMPLES / "images" / "three_shapes.png", "How many shapes are there?", "three"),
]
FRAMES = EXAMPLES / "frames" / "purple_circle_moving_right"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generate(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli_main(["generate", *map(str, argv)]) == 0
    return capsys.readouterr().out.strip()


# ----- the model directory -----------------------------------------------------------------------------------------


def test_load_default_and_from_pretrained():
    path = otter.default_model_path()
    assert path.is_dir() and path == REPO_ROOT / "otter" / "default_model"
    model, processor = otter.load_default()
    assert isinstance(model, OtterForConditionalGeneration) and isinstance(processor, OtterProcessor)
    assert not model.training and model.device.type == "cpu"
    assert (path / "README.md").read_text().split("\n# ", 1)[1].startswith("otter-tiny-shapes")
    # The Auto classes and the concrete class load the same weights from the path.
    auto = AutoModelForImageTextToText.from_pretrained(path)
    direct = OtterForConditionalGeneration.from_pretrained(path)
    for (name, value), other, third in zip(
        model.state_dict().items(), auto.state_dict().values(), direct.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other) and torch.equal(value, third), name
    assert isinstance(AutoProcessor.from_pretrained(path), OtterProcessor)
    # The shipped files: safetensors only, and small.
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt")) for name in files)
    assert sum(files.values()) <= 25 * 2**20
    # Token ids agree between the config, the tokenizer and the generation config (stops at <|endofchunk|>).
    assert processor.special_token_ids == {
        "media_token_id": model.config.media_token_id,
        "endofchunk_token_id": model.config.endofchunk_token_id,
        "answer_token_id": model.config.answer_token_id,
    }
    assert model.config.endofchunk_token_id in model.generation_config.eos_token_id
    assert len(processor.tokenizer) == model.get_input_embeddings().weight.shape[0]


def test_model_card_states_the_accuracy():
    card = (otter.default_model_path() / "README.md").read_text()
    results = json.loads((otter.default_model_path() / "eval_results.json").read_text())
    assert results["total"] >= 200 and results["accuracy"] >= 0.9
    stated = re.search(r"Held-out accuracy: ([\d.]+)%\*\* \((\d+) of (\d+)", card)
    assert stated, "the model card states the held-out accuracy"
    assert float(stated.group(1)) == pytest.approx(100 * results["accuracy"], abs=0.05)
    assert (int(stated.group(2)), int(stated.group(3))) == (results["correct"], results["total"])
    for needle in ("scripts/build_default_model.py", "python -m otter.train", "seed", "configs/otter-tiny-shapes.json"):
        assert needle in card


def test_model_display_name():
    from otter.default import model_display_name

    assert model_display_name(otter.default_model_path()) == "otter-tiny-shapes"
    assert model_display_name("/models/OTTER-Image-LLaMA7B-LA-InContext/") == "OTTER-Image-LLaMA7B-LA-InContext"
    assert model_display_name("") == ""


def test_default_model_path_missing(monkeypatch, tmp_path):
    monkeypatch.setattr("otter.default._DEFAULT_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="build_default_model.py"):
        otter.default_model_path()


def test_wheel_includes_the_default_model(tmp_path):
    """A non-editable install (`pip install .`) gets the model: build the wheel from a copy of the sources."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("otter", "flamingo"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=ignore)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*command, "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("otter_flamingo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"otter/default_model/{p.name}" for p in otter.default_model_path().iterdir()}
    assert shipped <= names, sorted(shipped - names)
    assert "otter/default.py" in names and "otter/evaluate.py" in names


# ----- `otter generate` on held-out questions ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Held-out shapes questions drawn with a new seed, as files for the command line: 24 single-image questions
    (8 per type), 6 in-context ones and 6 videos (their colour and their direction, each asked on its own)."""
    directory = tmp_path_factory.mktemp("heldout")
    yaml_path = make_shapes_eval_set(directory, seed=TEST_SEED, num_image=24, num_in_context=6, num_videos=6)
    question_set = load_question_set(load_mixture_yaml(yaml_path), all_turns=True)
    cases = []
    for number, question in enumerate(question_set.questions):
        media = question_set.load_media(question)
        files = []
        for index, frames in enumerate(media):
            folder = directory / "media" / f"{number:03d}_{index}"
            folder.mkdir(parents=True)
            for frame_index, frame in enumerate(frames):
                frame.save(folder / f"frame_{frame_index}.png")
            files.append(folder)
        if question.task_type == TaskType.VIDEO:
            argv = ["--frames", files[0]]
        else:
            argv = []
            for (_, answer), folder in zip(question.history, files[:-1], strict=True):
                argv += ["--in-context", folder / "frame_0.png", answer]
            argv += ["--image", files[-1] / "frame_0.png"]
        cases.append((question, [*argv, "--prompt", question.question]))
    kinds = {question.task_type for question, _ in cases}
    assert kinds == {TaskType.IMAGE, TaskType.IN_CONTEXT, TaskType.VIDEO}
    return cases


def test_cli_answers_heldout_questions(heldout, capsys):
    results = []
    for question, argv in heldout:
        answer = generate(capsys, *argv, "--max-new-tokens", "8")
        results.append((question.group, question.answer, answer, normalize_answer(answer) == question.answer))
    accuracy = sum(ok for *_, ok in results) / len(results)
    wrong = [(group, expected, got) for group, expected, got, ok in results if not ok]
    assert accuracy >= 0.9, f"{accuracy:.1%} correct; wrong (type, expected, got): {wrong}"
    # Every kind of question is asked: colour, shape, count, in-context, and both video questions.
    assert {group for group, *_ in results} == {"colour", "shape", "count", "video_colour", "motion"}


def test_cli_answers_about_the_bundled_examples(capsys):
    answers = [
        (image.name, question, expected, generate(capsys, "--image", image, "--prompt", question))
        for image, question, expected in BUNDLED
    ]
    frames = [
        ("What colour is the moving shape?", "purple"),
        ("Which way does it move?", "right"),
    ]
    answers += [
        (FRAMES.name, q, expected, generate(capsys, "--frames", FRAMES, "--prompt", q)) for q, expected in frames
    ]
    wrong = [entry for entry in answers if normalize_answer(entry[3]) != entry[2]]
    assert not wrong, wrong
    # In context: two bundled examples with their answers, then the question about a third image.
    answer = generate(
        capsys,
        "--in-context", EXAMPLES / "images" / "blue_square.png", "square",
        "--in-context", EXAMPLES / "images" / "green_triangle.png", "triangle",
        "--image", EXAMPLES / "images" / "yellow_circle.png",
        "--prompt", "What shape is it?",
    )  # fmt: skip
    assert answer == "circle"


def test_cli_answers_about_an_animated_gif(tmp_path, capsys):
    """`--video` takes an animated GIF; a clip longer than the model's 4 frames is resampled evenly, as in training."""
    from PIL import Image

    frames = [Image.open(path).convert("RGB") for path in sorted(FRAMES.glob("*.png"))]
    # 7 frames: each bundled frame, with the midpoints between neighbours; resampling keeps frames 0, 2, 4 and 6.
    clip = [frames[0]]
    for before, after in zip(frames, frames[1:], strict=False):
        clip += [Image.blend(before, after, 0.5), after]
    gif = tmp_path / "clip.gif"
    clip[0].save(gif, save_all=True, append_images=clip[1:], duration=100, loop=0)
    assert len(clip) == 7
    for question, expected in (("What colour is the moving shape?", "purple"), ("Which way does it move?", "right")):
        assert generate(capsys, "--video", gif, "--prompt", question) == expected
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert cli_main(["generate", "--video", str(mp4), "--prompt", "Which way does it move?"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--frames DIR" in error[0], error


def test_cli_streams_the_same_answer(capsys):
    image = EXAMPLES / "images" / "red_circle.png"
    assert generate(capsys, "--image", image, "--prompt", "What colour is the shape?", "--stream") == "red"


# ----- `otter eval` ------------------------------------------------------------------------------------------------


def test_otter_eval_on_generated_heldout_split(tmp_path, capsys):
    predictions, summary = tmp_path / "out" / "predictions.jsonl", tmp_path / "summary.json"
    argv = ["eval", "--shapes-seed", str(TEST_SEED), "--shapes-count", "30", "--output", str(predictions)]
    assert cli_main([*argv, "--summary-json", str(summary)]) == 0
    out = capsys.readouterr().out
    figures = json.loads(summary.read_text())
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    # 30 single-image questions, 10 in-context, 10 videos asked two questions each.
    assert figures["total"] == len(rows) == 30 + 10 + 2 * 10
    assert figures["accuracy"] >= 0.9
    assert f"accuracy: {figures['accuracy']:.4f} ({figures['correct']}/{figures['total']})" in out
    assert set(figures["by_group"]) == {"colour", "shape", "count", "video_colour", "motion"}
    assert set(figures["by_source"]) == {"SHAPES_IMAGE", "SHAPES_ICL", "SHAPES_VIDEO"}
    assert sum(row["correct"] for row in rows) == figures["correct"]
    assert {"id", "question", "answer", "prediction", "history"} <= set(rows[0])
    # The threshold option turns a low score into exit status 1.
    assert cli_main([*argv, "--min-accuracy", "1.01", "--max-samples", "2"]) == 1


def test_otter_eval_on_files(tmp_path, capsys):
    yaml_path = make_shapes_eval_set(
        tmp_path / "shapes", seed=TEST_SEED + 1, num_image=9, num_in_context=3, num_videos=3
    )
    model = str(otter.default_model_path())
    assert cli_main(["eval", "--model", model, "--mimicit-yaml", str(yaml_path), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    # Without --all-turns only the last turn of each video conversation is asked: 9 + 3 + 3.
    assert "SHAPES_ICL" in out and re.search(r"accuracy: [\d.]+ \(\d+/15\)", out)
    instructions = tmp_path / "shapes" / "SHAPES_ICL_instructions.json"
    argv = ["eval", "--instructions", str(instructions), "--images", str(tmp_path / "shapes" / "SHAPES_images.json")]
    argv += ["--train-config", str(tmp_path / "shapes" / "SHAPES_ICL_val.json"), "--task-type", "in_context"]
    assert cli_main(argv) == 0
    assert re.search(r"accuracy: [\d.]+ \(\d+/3\)", capsys.readouterr().out)


def test_otter_eval_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert cli_main(["eval", "--mimicit-yaml", str(tmp_path / "missing.yaml")]) == 2
    assert cli_main(["eval", "--instructions", str(tmp_path / "x.json"), "--task-type", "image"]) == 2
    assert cli_main(["eval", "--device", "cuda:7"]) == 2 if not torch.cuda.is_available() else True
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 + (not torch.cuda.is_available()), err
    assert all(line.startswith("otter eval: error: ") for line in err), err
    assert "model not found" in err[0] and "missing.yaml" in err[1] and "--images" in err[2]
    assert torch.cuda.is_available() or "'cuda:7' is not available" in err[3]
