"""Make the otter-ai reference fixtures in tests/fixtures/reference/otter/.

Runs in a separate environment with the real otter-ai package, never in the project's venv, and never imports this
project's packages:

    python3 -m venv /work/refvenv-otter
    /work/refvenv-otter/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/refvenv-otter/bin/pip install --no-deps otter-ai==0.0.0a8
    /work/refvenv-otter/bin/pip install transformers==4.35.1 accelerate==0.25.0 peft==0.7.1 einops einops-exts \
        safetensors sentencepiece
    /work/refvenv-otter/bin/python scripts/make_otter_fixtures.py

(A plain `pip install otter-ai` does not finish: its ~40 unpinned requirements, gradio among them, send pip's
resolver backtracking through dozens of releases. Only the packages that `otter_ai`'s model code imports are
installed; accelerate and peft are the last releases before December 2023, which work with its transformers==4.35.1.)

It builds a tiny `otter_ai.OtterForConditionalGeneration` with otter-ai's own classes, offline:

- the config is an `otter_ai` `OtterConfig` in the 2024 shape (text config with `architectures:
  ["LlamaForCausalLM"]`, top-level `max_num_frames`), with tiny sizes;
- `OtterForConditionalGeneration.__init__` loads a tokenizer from `text_config._name_or_path`: it points at a tiny
  local tokenizer written here (tokenizers' WordLevel model; ids `<PAD>` 0, `<s>` 1, `</s>` 2, `<|endofchunk|>` 3,
  `<image>` 4, `<answer>` 5, `<unk>` 6, as in tests/fixtures/tiny-tokenizer, whose tokenizer.json is too new for
  transformers 4.35);
- otter-ai hard-codes `self.vis_dim = 1024` (CLIP ViT-L/14), which fixes the perceiver at 6 x (1024-wide) layers,
  ~240 MB. This script substitutes the tiny vision width at the two calls that read `vis_dim`
  (`OtterPerceiverResampler(dim=...)` and `init_otter(vis_hidden_size=...)`); every module is otter-ai's own and
  the perceiver / cross-attention keep their hard-wired sizes (depth 6, 8 heads x 64, 64 latents, FF x4).

All weights are then redrawn at O(1) scale from a fixed seed (tanh gates at 0.5, frame embeddings N(0, 1)) so that
images, frames and every block move the logits. The model is written with otter-ai's own `save_pretrained` to
`model/`, with fixed inputs (2 samples x 2 images x 2 frames) and one forward pass's logits.
"""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import otter_ai.models.otter.modeling_otter as modeling_otter
import torch
from otter_ai.models.otter.configuration_otter import OtterConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SEED = 4321
PAD, BOS, EOS, EOC, MEDIA, ANSWER, UNK = range(7)
SPECIAL_TOKENS = ["<PAD>", "<s>", "</s>", "<|endofchunk|>", "<image>", "<answer>", "<unk>"]
VOCAB_SIZE = 128
MAX_NUM_FRAMES = 2

VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "quick_gelu",
}
TEXT = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "_name_or_path": "tiny-tokenizer",  # relative: resolved in the temporary folder the tokenizer is written to
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
}
CROSS_ATTN_EVERY_N_LAYERS = 2


def write_tiny_tokenizer(folder: Path):
    """A WordLevel tokenizer with the tiny tokenizer's special-token ids, readable by transformers 4.35."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<PAD>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def build_model():
    """otter-ai's OtterForConditionalGeneration at tiny sizes (see the module docstring for the vis_dim patch)."""
    config = OtterConfig(
        vision_config=dict(VISION),
        text_config=dict(TEXT),
        cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
        max_num_frames=MAX_NUM_FRAMES,
    )
    original_perceiver = modeling_otter.OtterPerceiverResampler
    original_init_otter = modeling_otter.OtterLMMixin.init_otter
    width = VISION["hidden_size"]

    def perceiver(*, dim, **kwargs):
        return original_perceiver(dim=width, **kwargs)

    def init_otter(self, *, vis_hidden_size, **kwargs):
        return original_init_otter(self, vis_hidden_size=width, **kwargs)

    modeling_otter.OtterPerceiverResampler = perceiver
    modeling_otter.OtterLMMixin.init_otter = init_otter
    try:
        model = modeling_otter.OtterForConditionalGeneration(config)
    finally:
        modeling_otter.OtterPerceiverResampler = original_perceiver
        modeling_otter.OtterLMMixin.init_otter = original_init_otter
    model.vis_dim = width
    assert model.media_token_id == MEDIA and model.eoc_token_id == EOC, (model.media_token_id, model.eoc_token_id)
    return model.eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, generator: torch.Generator):
    """O(1) activations everywhere: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), embeddings,
    latents and frame embeddings ~ N(0, 1), tanh gates at 0.5."""
    for name, param in model.named_parameters():
        if name.endswith(("attn_gate", "ff_gate")):
            param.fill_(0.5)
        elif name.endswith(("embed_tokens.weight", "latents", "frame_embs", "class_embedding")):
            param.copy_(torch.randn(param.shape, generator=generator))
        elif param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(math.prod(param.shape[1:])))
        elif name.endswith("bias"):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))


def make_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """2 samples x 2 images x 2 frames. Row 0: Otter's prompt shape `<s><image>User: .. GPT:<answer> ..
    <|endofchunk|><image>..`; row 1 is left-padded and has text before its first image."""

    def text(n):
        return torch.randint(10, VOCAB_SIZE, (n,), generator=generator).tolist()

    row0 = [BOS, MEDIA, *text(3), ANSWER, *text(2), EOC, MEDIA, *text(3), ANSWER]
    row1 = [BOS, *text(2), MEDIA, *text(2), ANSWER, EOC, MEDIA, *text(2)]
    width = max(len(row0), len(row1))
    lang_x = torch.full((2, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate((row0, row1)):
        lang_x[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    size = VISION["image_size"]
    vision_x = torch.randn(2, 2, MAX_NUM_FRAMES, 3, size, size, generator=generator)
    return {"vision_x": vision_x, "lang_x": lang_x, "attention_mask": attention_mask}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "otter"
    parser.add_argument("--output", type=Path, default=default_out)
    args = parser.parse_args(argv)
    output = args.output.resolve()

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        write_tiny_tokenizer(Path(scratch) / "tiny-tokenizer")
        os.chdir(scratch)  # so that text_config._name_or_path stays the relative "tiny-tokenizer"
        try:
            model = build_model()
        finally:
            os.chdir(cwd)
    randomize(model, generator)
    inputs = make_inputs(generator)

    def forward(vision_x):
        with torch.no_grad():
            return model(vision_x=vision_x, lang_x=inputs["lang_x"], attention_mask=inputs["attention_mask"]).logits

    logits = forward(inputs["vision_x"]).float()
    if not torch.isfinite(logits).all():
        raise SystemExit("reference logits are not finite")
    attended = inputs["attention_mask"].bool()
    image_sensitivity = float(
        (forward(torch.randn(inputs["vision_x"].shape, generator=generator)) - logits)[attended].abs().max()
    )
    with torch.no_grad():
        frame_embs = model.perceiver.frame_embs.clone()
        model.perceiver.frame_embs.zero_()
        frame_sensitivity = float((forward(inputs["vision_x"]) - logits)[attended].abs().max())
        model.perceiver.frame_embs.copy_(frame_embs)

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output / "model", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(output / "inputs.safetensors"))
    save_file({"logits": logits.contiguous()}, str(output / "logits.safetensors"))
    meta = {
        "generator": "scripts/make_otter_fixtures.py",
        "seed": SEED,
        "versions": {
            "python": platform.python_version(),
            "otter_ai": version("otter-ai"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "safetensors": version("safetensors"),
            "einops": version("einops"),
            "peft": version("peft"),
            "accelerate": version("accelerate"),
        },
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "saved_with": "otter_ai OtterForConditionalGeneration.save_pretrained (safetensors)",
        "vis_dim_patch": f"vis_dim 1024 -> {VISION['hidden_size']} at OtterPerceiverResampler(dim=) and init_otter()",
        "dtype": "float32",
        # Otter reads these from its tokenizer; our config has fields for them (published defaults: 32001/32000/32002).
        "token_ids": {"media_token_id": MEDIA, "endofchunk_token_id": EOC, "answer_token_id": ANSWER},
        # otter-ai 0.0.0a8 forces use_media_placement_augmentation=False, so attend_previous is always True.
        "only_attend_previous": True,
        "inputs": {
            "vision_x": list(inputs["vision_x"].shape),
            "lang_x": inputs["lang_x"].tolist(),
            "attention_mask": inputs["attention_mask"].tolist(),
        },
        "compare": "logits at positions where attention_mask == 1 (padded query rows are undefined)",
        "image_sensitivity": image_sensitivity,
        "frame_embs_sensitivity": frame_sensitivity,
        "logits_abs_max": float(logits.abs().max()),
    }
    (output / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    print(f"wrote logits {tuple(logits.shape)}, {total / 1e6:.2f} MB to {output}")
    print(f"image sensitivity {image_sensitivity:.3g}, frame-embedding sensitivity {frame_sensitivity:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
