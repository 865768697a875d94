"""An Otter checkpoint saved by the real otter-ai package loads with our `from_pretrained` and gives its logits.

`tests/fixtures/reference/otter/` was written by `scripts/make_otter_fixtures.py` in a separate venv with otter-ai
0.0.0a8 (transformers 4.35.1): a tiny `otter_ai.OtterForConditionalGeneration` (2024 config shape, with
`max_num_frames`), saved with its own `save_pretrained`, fixed inputs with 2 images x 2 frames per sample, and the
logits of one forward pass. Nothing here imports otter_ai.

The one deliberate difference in the folder: otter-ai reads the special-token ids from its tokenizer, ours from the
config, whose defaults are the published LLaMA ids (32000-32002). The tiny tokenizer's ids are passed to
`from_pretrained` as config overrides, as a user of a re-tokenised model would.
"""

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from otter import OtterForConditionalGeneration  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference" / "otter"
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    return {
        "meta": json.loads((FIXTURE / "meta.json").read_text()),
        "inputs": load_file(str(FIXTURE / "inputs.safetensors")),
        "logits": load_file(str(FIXTURE / "logits.safetensors"))["logits"],
    }


def load(reference, **overrides):
    return OtterForConditionalGeneration.from_pretrained(
        FIXTURE / "model", output_loading_info=True, **reference["meta"]["token_ids"], **overrides
    )


def forward(model, inputs, **changes):
    inputs = {**inputs, **changes}
    with torch.no_grad():
        return model(
            vision_x=inputs["vision_x"], lang_x=inputs["lang_x"], attention_mask=inputs["attention_mask"]
        ).logits


def test_fixture_comes_from_otter_ai(reference):
    meta = reference["meta"]
    assert meta["versions"]["otter_ai"] == "0.0.0a8"
    assert meta["model_class"] == "otter_ai.models.otter.modeling_otter.OtterForConditionalGeneration"
    config = json.loads((FIXTURE / "model" / "config.json").read_text())
    assert config["model_type"] == "otter" and config["max_num_frames"] == 2
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
    assert meta["inputs"]["vision_x"][2] == 2  # two frames per image: the frame embeddings are exercised


def test_loads_with_no_missing_or_unexpected_keys(reference, caplog):
    with caplog.at_level(logging.WARNING):
        model, info = load(reference)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.perceiver.frame_embs is not None and model.perceiver.frame_embs.shape[0] == 2
    assert "frame_embs" not in caplog.text  # they were in the checkpoint: no zero-initialisation warning


def test_logits_match_otter_ai(reference):
    model, _ = load(reference)
    logits = forward(model.eval(), reference["inputs"])
    attended = reference["inputs"]["attention_mask"].bool()
    assert logits.shape == reference["logits"].shape
    difference = (logits - reference["logits"])[attended].abs().max().item()
    assert difference <= ATOL, f"max |logit difference| {difference:.3g} > {ATOL}"


def test_the_fixture_discriminates_images_and_frames(reference):
    """Other images, or zeroed frame embeddings, move the logits far beyond the tolerance (the check is not blind)."""
    model, _ = load(reference)
    model.eval()
    attended = reference["inputs"]["attention_mask"].bool()
    expected = reference["logits"]
    other = torch.randn(reference["inputs"]["vision_x"].shape, generator=torch.Generator().manual_seed(0))
    assert (forward(model, reference["inputs"], vision_x=other) - expected)[attended].abs().max() > 100 * ATOL
    with torch.no_grad():
        model.perceiver.frame_embs.zero_()
    assert (forward(model, reference["inputs"]) - expected)[attended].abs().max() > 100 * ATOL
