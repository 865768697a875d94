"""`otter convert` on a training `checkpoint.pt` written by OpenFlamingo 2.0.1's own training code.

`tests/fixtures/reference/of2_training/` was written by `scripts/make_training_checkpoint_fixture.py` in the
OpenFlamingo reference venv: the tiny model of `reference/of2/`, frozen as OpenFlamingo's factory does, wrapped in
DDP, and saved by `open_flamingo.train.train_utils.save_checkpoint` (trainable parameters and embeddings only,
`module.` prefixes, nested under `model_state_dict` beside the optimizer and scheduler states), plus the frozen LM as
a plain `LlamaForCausalLM` folder and the open_clip vision tower's state dict. Converting the three must give the
reference logits of `reference/of2/`.

`tests/fixtures/reference/of1_training/` is the same for OpenFlamingo 0.0.2 (v1, the code behind OpenFlamingo-9B),
written by `scripts/make_training_checkpoint_fixture_of1.py`: the tiny model of `reference/of1/`, built and frozen by
0.0.2's own `create_model_and_transforms`, wrapped in DDP and saved as 0.0.2's train.py saves it (its
`train_utils.get_checkpoint`: `model.state_dict()` minus the frozen parameters' names). That keeps both names of
every cross-attention tensor (`lang_encoder.model.layers.{i}.gated_cross_attn_layer.*` and the alias
`lang_encoder.gated_cross_attn_layers.{i}.*`) and LLaMA's `rotary_emb.inv_freq` buffers (transformers 4.28), which
2.0.1's filter never saves. The LM folder holds the factory's resized embeddings and its tokenizer; the conversion
uses the v1 config (`only_attend_previous: false`) and must give the logits and greedy tokens of `reference/of1/`.

Nothing here imports open_flamingo.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import generate_as_reference  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flamingo import FlamingoForConditionalGeneration  # noqa: E402
from otter.convert import main  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
FIXTURE = REFERENCE / "of2_training"
FIXTURE_V1 = REFERENCE / "of1_training"
ATOL = 1e-4


def convert_argv(output: Path, checkpoint: Path | None = None, fixture: Path = FIXTURE) -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint or fixture / "checkpoint.pt"),
        "--base-lm",
        str(fixture / "lm"),
        "--vision",
        str(fixture / "open_clip_visual.safetensors"),
        "--config",
        str(fixture / "config.json"),
        "--to",
        "flamingo",
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


@pytest.mark.parametrize(("fixture", "reference"), [(FIXTURE, "of2"), (FIXTURE_V1, "of1")], ids=["of2", "of1"])
def test_the_checkpoint_matters(tmp_path, fixture, reference):
    """Guard against a vacuous pass: with the checkpoint's gates closed (under both names in v1) the converted model
    is far from the reference, so the trained tensors really come from checkpoint.pt."""
    checkpoint = torch.load(fixture / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key, value in checkpoint["model_state_dict"].items():
        if key.endswith(("attn_gate", "ff_gate")):
            value.zero_()
    torch.save(checkpoint, tmp_path / "closed.pt")
    output = tmp_path / "closed-hf"
    assert main(convert_argv(output, tmp_path / "closed.pt", fixture)) == 0
    model = FlamingoForConditionalGeneration.from_pretrained(output).eval()
    inputs = load_file(str(REFERENCE / reference / "inputs.safetensors"))
    expected = load_file(str(REFERENCE / reference / "logits.safetensors"))["logits"]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - expected)[inputs["attention_mask"].bool()].abs().max() > 100 * ATOL


# ----- OpenFlamingo 0.0.2 (v1) ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_v1(tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "openflamingo-v1-tiny-hf"
    assert main(convert_argv(output, fixture=FIXTURE_V1)) == 0
    return output


def test_v1_checkpoint_is_openflamingo_0_0_2_training_output():
    """What 0.0.2's get_checkpoint leaves: the duplicated xattn aliases and the rotary buffers are really there, so
    the conversion below proves the converter handles them."""
    meta = json.loads((FIXTURE_V1 / "meta.json").read_text())
    assert meta["versions"]["open_flamingo"] == "0.0.2" and meta["versions"]["transformers"] == "4.28.1"
    assert json.loads((FIXTURE_V1 / "config.json").read_text())["only_attend_previous"] is False
    checkpoint = torch.load(FIXTURE_V1 / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict"}
    state_dict = checkpoint["model_state_dict"]
    assert all(k.startswith("module.") for k in state_dict)  # DDP
    assert "module.lang_encoder.model.embed_tokens.weight" in state_dict
    assert "module.perceiver.layers.0.1.1.weight" in state_dict
    layer = "module.lang_encoder.model.layers.3.gated_cross_attn_layer."
    alias = "module.lang_encoder.gated_cross_attn_layers.3."
    in_layer = {k[len(layer) :] for k in state_dict if k.startswith(layer)}
    aliased = {k[len(alias) :] for k in state_dict if k.startswith(alias)}
    assert "ff.1.weight" in in_layer and in_layer == aliased  # every xattn tensor saved under both names
    assert all(torch.equal(state_dict[layer + k], state_dict[alias + k]) for k in in_layer)
    rotary = [k for k in state_dict if k.endswith("self_attn.rotary_emb.inv_freq")]
    assert len(rotary) == 4  # one persistent buffer per decoder layer (transformers 4.28)
    # Frozen parameters are not saved: decoder weights, lm_head, the vision encoder.
    assert not any(k.endswith("decoder_layer.mlp.up_proj.weight") or "lm_head" in k for k in state_dict)
    assert not any(k.startswith("module.vision_encoder.") for k in state_dict)


def test_converted_v1_training_checkpoint_gives_the_reference_logits(converted_v1):
    model, info = FlamingoForConditionalGeneration.from_pretrained(converted_v1, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.only_attend_previous is False
    inputs = load_file(str(REFERENCE / "of1" / "inputs.safetensors"))
    expected = load_file(str(REFERENCE / "of1" / "logits.safetensors"))["logits"]
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    assert logits.shape == expected.shape
    attended = inputs["attention_mask"].bool()
    difference = (logits - expected)[attended].abs().max().item()
    assert difference <= ATOL, f"max |logit difference| {difference:.3g} > {ATOL}"


def test_converted_v1_training_checkpoint_generates_the_reference_tokens(converted_v1):
    model = FlamingoForConditionalGeneration.from_pretrained(converted_v1).eval()
    settings = json.loads((REFERENCE / "of1" / "meta.json").read_text())["generate"]
    inputs = load_file(str(REFERENCE / "of1" / "inputs.safetensors"))
    generated = generate_as_reference(model, inputs, settings)
    assert torch.equal(generated, load_file(str(REFERENCE / "of1" / "logits.safetensors"))["generated"])
