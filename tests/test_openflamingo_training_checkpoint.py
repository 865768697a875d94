"""`otter convert` on a training `checkpoint.pt` written by OpenFlamingo 2.0.1's own training code.

`tests/fixtures/reference/of2_training/` was written by `scripts/make_training_checkpoint_fixture.py` in the
OpenFlamingo reference venv: the tiny model of `reference/of2/`, frozen as OpenFlamingo's factory does, wrapped in
DDP, and saved by `open_flamingo.train.train_utils.save_checkpoint` (trainable parameters and embeddings only,
`module.` prefixes, nested under `model_state_dict` beside the optimizer and scheduler states), plus the frozen LM as
a plain `LlamaForCausalLM` folder and the open_clip vision tower's state dict. Converting the three must give the
reference logits of `reference/of2/`. Nothing here imports open_flamingo.
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flamingo import FlamingoForConditionalGeneration  # noqa: E402
from otter.convert import main  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
FIXTURE = REFERENCE / "of2_training"
ATOL = 1e-4


def convert_argv(output: Path, checkpoint: Path = FIXTURE / "checkpoint.pt") -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--base-lm",
        str(FIXTURE / "lm"),
        "--vision",
        str(FIXTURE / "open_clip_visual.safetensors"),
        "--config",
        str(FIXTURE / "config.json"),
        "--output",
        str(output),
        "--quiet",
    ]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "openflamingo-tiny-hf"
    assert main(convert_argv(output)) == 0
    return output


def test_checkpoint_is_openflamingo_training_output():
    """The layout OpenFlamingo's save_checkpoint writes (read here with weights_only=True, as the converter does)."""
    checkpoint = torch.load(FIXTURE / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict"}
    keys = set(checkpoint["model_state_dict"])
    assert all(k.startswith("module.") for k in keys)  # DDP
    assert "module.lang_encoder.model.embed_tokens.weight" in keys  # kept: its name contains "embed"
    assert "module.perceiver.layers.0.1.1.weight" in keys  # OpenFlamingo's perceiver layout
    assert "module.lang_encoder.model.layers.1.gated_cross_attn_layer.ff.1.weight" in keys
    # filter_state_dict_to_trainable: frozen weights, aliases and the vision encoder are not saved.
    assert not any("decoder_layer" in k or "lm_head" in k or "vision_encoder" in k for k in keys)
    assert not any("gated_cross_attn_layers" in k or "old_decoder_blocks" in k for k in keys)


def test_converted_training_checkpoint_gives_the_reference_logits(converted):
    model, info = FlamingoForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = load_file(str(REFERENCE / "of2" / "inputs.safetensors"))
    expected = load_file(str(REFERENCE / "of2" / "logits.safetensors"))["logits"]
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    attended = inputs["attention_mask"].bool()
    difference = (logits - expected)[attended].abs().max().item()
    assert difference <= ATOL, f"max |logit difference| {difference:.3g} > {ATOL}"


def test_the_checkpoint_matters(tmp_path):
    """Guard against a vacuous pass: with the checkpoint's gates closed the converted model is far from the
    reference, so the trained tensors really come from checkpoint.pt."""
    checkpoint = torch.load(FIXTURE / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key, value in checkpoint["model_state_dict"].items():
        if key.endswith(("attn_gate", "ff_gate")):
            value.zero_()
    torch.save(checkpoint, tmp_path / "closed.pt")
    output = tmp_path / "closed-hf"
    assert main(convert_argv(output, tmp_path / "closed.pt")) == 0
    model = FlamingoForConditionalGeneration.from_pretrained(output).eval()
    inputs = load_file(str(REFERENCE / "of2" / "inputs.safetensors"))
    expected = load_file(str(REFERENCE / "of2" / "logits.safetensors"))["logits"]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - expected)[inputs["attention_mask"].bool()].abs().max() > 100 * ATOL
