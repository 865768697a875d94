"""`otter train` / `python -m otter.train` errors a user can fix: one line on stderr, exit status 2, the traceback only
with --debug."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, TINY_TOKENIZER, tiny_model
from transformers import AutoTokenizer

from otter.cli import main as otter_main
from otter.data import DataError
from otter.data.shapes import make_shapes_dataset
from otter.train import ArgumentError, error_line, main, print_error

# Lines that are not the error: log records and progress bars.
NOISE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) |Loading weights|it/s\]|%\|")


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.strip() and not NOISE.search(line)]


def assert_one_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("otter train: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=0, num_image=4, num_in_context=2, num_videos=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-otter")
    tiny_model("otter", seed=0).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(path)
    return path


def run_args(model, output_dir, *data):
    return ["--model", str(model), *data, "--output-dir", str(output_dir), "--max-steps", "1", "--num-workers", "0"]


def image_task(shapes, instructions=None):
    instructions = instructions or shapes.output_dir / "SHAPES_IMAGE_instructions.json"
    return ["--instructions", str(instructions), "--images", str(shapes.images)]


@pytest.fixture
def bad_record(shapes, tmp_path):
    """The image-task instructions with one record pointing at an image that is not in the images file."""
    content = json.loads((shapes.output_dir / "SHAPES_IMAGE_instructions.json").read_text())
    record_id = sorted(content["data"])[0]
    content["data"][record_id]["image_ids"] = ["NO_SUCH_IMAGE"]
    path = tmp_path / "broken_instructions.json"
    path.write_text(json.dumps(content))
    return path, record_id


def test_missing_model(shapes, tmp_path, capsys):
    assert main(run_args("/nonexistent", tmp_path / "out", *image_task(shapes))) == 2
    assert_one_line(capsys.readouterr().err, "model not found: /nonexistent")
    assert not (tmp_path / "out").exists()


def test_unloadable_model_directory(shapes, tmp_path, capsys):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(run_args(broken, tmp_path / "out", *image_task(shapes))) == 2
    assert_one_line(capsys.readouterr().err)


def test_config_json_needs_a_tokenizer(shapes, tmp_path, capsys):
    config = REPO_ROOT / "configs" / "otter-tiny.json"
    assert main(run_args(config, tmp_path / "out", *image_task(shapes))) == 2
    assert_one_line(capsys.readouterr().err, "--tokenizer")


@pytest.mark.parametrize("option", ["--mimicit-yaml", "--instructions", "--images", "--train-config"])
def test_missing_data_files(option, model_dir, shapes, tmp_path, capsys):
    data = {"--mimicit-yaml": [option, "missing.yaml"], "--train-config": [*image_task(shapes), option, "missing.json"]}
    data["--instructions"] = ["--instructions", "missing.json", "--images", str(shapes.images)]
    data["--images"] = [*image_task(shapes)[:2], "--images", "missing.json"]
    assert main(run_args(model_dir, tmp_path / "out", *data[option])) == 2
    assert_one_line(capsys.readouterr().err, f"{option} file not found: missing.")


def test_malformed_yaml(model_dir, tmp_path, capsys):
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text("IMAGE_TEXT: [unclosed\n")
    assert main(run_args(model_dir, tmp_path / "out", "--mimicit-yaml", str(yaml_file))) == 2
    assert_one_line(capsys.readouterr().err, str(yaml_file), "invalid YAML")


def test_bad_record(model_dir, shapes, bad_record, tmp_path, capsys):
    path, record_id = bad_record
    assert main(run_args(model_dir, tmp_path / "out", *image_task(shapes, path))) == 2
    assert_one_line(capsys.readouterr().err, str(path), repr(record_id), "NO_SUCH_IMAGE")


def test_debug_shows_the_traceback(model_dir, shapes, bad_record, tmp_path):
    path, _ = bad_record
    argv = run_args(model_dir, tmp_path / "out", *image_task(shapes, path))
    with pytest.raises(DataError, match="NO_SUCH_IMAGE"):
        main([*argv, "--debug"])
    with pytest.raises(DataError, match="NO_SUCH_IMAGE"):
        otter_main(["--debug", "train", *argv])
    with pytest.raises(ArgumentError, match="model not found"):
        otter_main(["--debug", "train", *run_args("/nonexistent", tmp_path / "out", *image_task(shapes))])


def test_through_the_otter_command(model_dir, shapes, bad_record, tmp_path, capsys):
    path, record_id = bad_record
    assert otter_main(["train", *run_args(model_dir, tmp_path / "out", *image_task(shapes, path))]) == 2
    assert_one_line(capsys.readouterr().err, repr(record_id))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "--train", "lm"], "--lora trains adapters instead of the LM body"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
    ],
)
def test_conflicting_options(extra, message, model_dir, shapes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*run_args(model_dir, tmp_path / "out", *image_task(shapes)), *extra])
    assert exited.value.code == 2
    assert_one_line(capsys.readouterr().err, message)


def test_python_m_otter_train(shapes, tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "otter.train", *run_args("/nonexistent", tmp_path / "out", *image_task(shapes))]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 2
    assert_one_line(done.stderr, "model not found: /nonexistent")


def test_a_dataloader_worker_error_is_one_line():
    """torch re-raises a worker's exception with the worker's traceback as its message; the line is its last."""
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("image is not decodable", "data/LA.json", "LA_00_0001")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert error_line(raised.value) == "data/LA.json: record 'LA_00_0001': image is not decodable"
    assert error_line(ValueError("first\nsecond")) == "first"
    assert error_line(OSError()) == "OSError"


def test_only_the_main_process_reports_argument_errors(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    print_error("same on every process")
    assert capsys.readouterr().err == ""
    print_error("only here", every_rank=True)
    assert capsys.readouterr().err == "otter train: error: [rank 1/2] only here\n"
    monkeypatch.setenv("RANK", "0")
    print_error("main")
    assert capsys.readouterr().err == "otter train: error: main\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")
