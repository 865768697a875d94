"""`otter convert` refuses bad inputs with one clear line and writes nothing: a truncated safetensors file or .pt
archive, a pickle whose `__reduce__` would run code, a checkpoint of another architecture (a BERT, an open_clip CLIP
state dict, an LM given as the vision tower) and a shape mismatch. The good inputs are the OpenFlamingo training
fixture (`tests/fixtures/reference/of2_training/`), so each case differs from a working conversion in one input."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from otter.convert import main  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference" / "of2_training"


def convert(tmp_path: Path, *flags: str, **inputs) -> tuple[int, Path]:
    """Run `otter convert` with the fixture's inputs, some replaced; return the exit status and the --output path."""
    arguments = {
        "--checkpoint": FIXTURE / "checkpoint.pt",
        "--base-lm": FIXTURE / "lm",
        "--vision": FIXTURE / "open_clip_visual.safetensors",
        "--config": FIXTURE / "config.json",
        **{f"--{name.replace('_', '-')}": value for name, value in inputs.items()},
    }
    output = tmp_path / "out" / "converted"
    argv = [str(part) for option, value in arguments.items() for part in (option, value)]
    return main([*argv, *flags, "--output", str(output), "--quiet"]), output


def assert_nothing_written(output: Path):
    assert not output.exists()
    leftovers = list(output.parent.iterdir()) if output.parent.exists() else []
    assert leftovers == [], f"staging folders left behind: {leftovers}"


def error_line(capsys) -> str:
    """The command's error message (one line, except for the list of mismatched shapes torch appends)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("otter convert: error: "), err
    return err


def test_the_good_inputs_convert(tmp_path):
    status, output = convert(tmp_path)
    assert status == 0 and (output / "model.safetensors").is_file()


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_safetensors(keep, tmp_path, capsys):
    data = (FIXTURE / "lm" / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: int(len(data) * keep)])
    status, output = convert(tmp_path, checkpoint=truncated)
    assert status == 2
    error = error_line(capsys)
    assert "--checkpoint" in error and "truncated or corrupted" in error and "truncated.safetensors" in error
    assert_nothing_written(output)


def test_truncated_safetensors_in_the_base_lm_folder(tmp_path, capsys):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_bytes((FIXTURE / "lm" / "config.json").read_bytes())
    (lm / "model.safetensors").write_bytes((FIXTURE / "lm" / "model.safetensors").read_bytes()[:1000])
    status, output = convert(tmp_path, base_lm=lm)
    assert status == 2
    assert "--base-lm" in (error := error_line(capsys)) and "truncated or corrupted" in error
    assert_nothing_written(output)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_truncated_pt(zip_format, tmp_path, capsys):
    checkpoint = torch.load(FIXTURE / "checkpoint.pt", map_location="cpu", weights_only=True)
    whole = tmp_path / "whole.pt"
    torch.save(checkpoint, whole, _use_new_zipfile_serialization=zip_format)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    status, output = convert(tmp_path, checkpoint=truncated)
    assert status == 2
    error = error_line(capsys)
    assert "truncated or corrupted" in error and "unsafe" not in error
    assert_nothing_written(output)


def write_marker(path):  # what the malicious pickle would run on load
    Path(path).write_text("code from a checkpoint ran")


class Malicious:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (write_marker, (self.path,))


def test_malicious_pickle_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    checkpoint = torch.load(FIXTURE / "checkpoint.pt", map_location="cpu", weights_only=True)
    checkpoint["epoch"] = Malicious(str(marker))  # real weights beside it: only the payload is bad
    torch.save(checkpoint, tmp_path / "evil.pt")
    status, output = convert(tmp_path, checkpoint=tmp_path / "evil.pt")
    assert status == 2
    error = error_line(capsys)
    assert "unsafe pickle" in error and "never runs code" in error and "safetensors" in error
    assert not marker.exists()
    assert_nothing_written(output)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128
    )
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("allow_missing", [False, True])
def test_bert_checkpoint_is_refused(bert_folder, allow_missing, tmp_path, capsys):
    """A plain BERT passed as the trained checkpoint: refused even with --allow-missing, which would otherwise
    write a model whose perceiver and cross-attention are freshly initialised."""
    flags = ["--allow-missing"] if allow_missing else []
    status, output = convert(tmp_path, *flags, checkpoint=bert_folder / "model.safetensors")
    assert status == 2
    error = error_line(capsys)
    assert "none of its" in error and "bert.embeddings" in error and "not an OpenFlamingo/Otter checkpoint" in error
    assert_nothing_written(output)


def test_bert_as_base_lm_is_refused(bert_folder, tmp_path, capsys):
    status, output = convert(tmp_path, base_lm=bert_folder)
    assert status == 2
    error = error_line(capsys)
    assert "--base-lm" in error and "could not find the decoder layer list" in error
    assert_nothing_written(output)


def test_clip_only_state_dict_is_refused(tmp_path, capsys):
    """A whole open_clip CLIP state dict (vision under `visual.`, a text tower) passed as the checkpoint."""
    clip = {f"visual.{k}": v for k, v in load_file(str(FIXTURE / "open_clip_visual.safetensors")).items()}
    clip |= {"token_embedding.weight": torch.zeros(16, 8), "positional_embedding": torch.zeros(8, 8)}
    clip |= {"text_projection": torch.zeros(8, 8), "logit_scale": torch.ones(())}
    save_file(clip, str(tmp_path / "open_clip.safetensors"))
    status, output = convert(tmp_path, checkpoint=tmp_path / "open_clip.safetensors")
    assert status == 2
    error = error_line(capsys)
    assert f"none of its {len(clip)} tensors" in error and "not an OpenFlamingo/Otter checkpoint" in error
    assert_nothing_written(output)


def test_language_model_as_vision_tower_is_refused(tmp_path, capsys):
    status, output = convert(tmp_path, vision=FIXTURE / "lm")
    assert status == 2
    error = error_line(capsys)
    assert "--vision" in error and "not part of an HF CLIP vision tower" in error and "lm_head.weight" in error
    assert_nothing_written(output)


def test_shape_mismatch_is_refused(tmp_path, capsys):
    checkpoint = torch.load(FIXTURE / "checkpoint.pt", map_location="cpu", weights_only=True)
    checkpoint["model_state_dict"]["module.perceiver.latents"] = torch.zeros(32, 8)  # the config says 64 latents
    torch.save(checkpoint, tmp_path / "other-shape.pt")
    status, output = convert(tmp_path, checkpoint=tmp_path / "other-shape.pt")
    assert status == 2
    error = error_line(capsys)
    assert "do not fit the config" in error and "perceiver.latents" in error
    assert "torch.Size([32, 8])" in error and "torch.Size([64, 8])" in error
    assert_nothing_written(output)
