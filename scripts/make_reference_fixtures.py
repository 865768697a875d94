"""Make the OpenFlamingo 2.0.1 reference fixtures in tests/fixtures/reference/of2/.

Runs in a separate environment with the real reference code, never in the project's venv, and never imports this
project's packages:

    python3 -m venv /work/refvenv-of2
    /work/refvenv-of2/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/refvenv-of2/bin/pip install --no-deps open-flamingo==2.0.1
    /work/refvenv-of2/bin/pip install einops einops-exts transformers==4.33.3 open_clip_torch==2.20.0 safetensors
    /work/refvenv-of2/bin/python scripts/make_reference_fixtures.py

(open-flamingo 2.0.1 pins torch==2.0.1 and sentencepiece==0.1.98, hence --no-deps; neither pin matters for a CPU
forward pass. open_clip_torch must be <= 2.22: from 2.23 `ln_post` is applied to the patch tokens.)

It builds a tiny OpenFlamingo model in-process, with no download, exactly as open_flamingo's factory wires one:
an open_clip ViT from `open_clip.model._build_vision_tower` (what `open_clip.create_model` calls; QuickGELU as in
OpenAI's weights) with `output_tokens=True`, a tiny `LlamaForCausalLM` from a config, `extend_instance(...,
FlamingoLMMixin)`, and `open_flamingo.Flamingo(...)`, whose perceiver (depth 6, 8 heads x 64, 64 latents) and
gated cross-attention blocks (8 heads x 64, FF x4) keep OpenFlamingo's hard-wired published sizes. All weights are
then redrawn at O(1) scale (gates 0.5) so that every part moves the logits, and one forward pass on fixed inputs is
saved with the full state dict (original keys, aliases included).
"""

import argparse
import json
import math
import platform
import sys
import types
from importlib.metadata import version
from pathlib import Path

import open_clip
import torch
from open_flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 1234
PAD, BOS, EOS, EOC, MEDIA = 0, 1, 2, 3, 4  # ids of tests/fixtures/tiny-tokenizer

VISION = {"width": 8, "layers": 2, "head_width": 4, "mlp_ratio": 2.0, "patch_size": 8, "image_size": 32}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
}
CROSS_ATTN_EVERY_N_LAYERS = 2
MAX_NEW_TOKENS = 8


def build_model() -> Flamingo:
    vision = open_clip.model._build_vision_tower(embed_dim=8, vision_cfg=dict(VISION), quick_gelu=True)
    vision.output_tokens = True  # as open_flamingo's factory does: visual(x)[1] are the patch tokens
    lang_encoder = LlamaForCausalLM(LlamaConfig(**TEXT))
    extend_instance(lang_encoder, FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name("model.layers")
    model = Flamingo(
        types.SimpleNamespace(visual=vision),  # Flamingo keeps `vision_encoder.visual`
        lang_encoder,
        eoc_token_id=EOC,
        media_token_id=MEDIA,
        vis_dim=VISION["width"],
        cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
    )
    return model.eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, generator: torch.Generator):
    """O(1) activations everywhere: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), embeddings
    and latents ~ N(0, 1), tanh gates at 0.5, so images, text, every block and every norm change the logits."""
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if name.endswith(("attn_gate", "ff_gate")):
            param.fill_(0.5)
        elif name.endswith(("embed_tokens.weight", "latents", "class_embedding", "positional_embedding")):
            param.copy_(torch.randn(param.shape, generator=generator))
        elif param.dim() >= 2:
            fan_in = math.prod(param.shape[1:])
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
        elif name.endswith("bias"):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        else:  # norm weights
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))


def make_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """2 samples x 2 images. Row 0: `<s><image> text <|endofchunk|><image> text`. Row 1 is left-padded and has text
    before its first image (which therefore sees no image)."""

    def text(n):
        return torch.randint(10, TEXT["vocab_size"], (n,), generator=generator).tolist()

    row0 = [BOS, MEDIA, *text(3), EOC, MEDIA, *text(4), EOC]
    row1 = [BOS, *text(2), MEDIA, *text(2), EOC, MEDIA, *text(1)]
    width = max(len(row0), len(row1))
    lang_x = torch.full((2, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate((row0, row1)):
        lang_x[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    size = VISION["image_size"]
    vision_x = torch.randn(2, 2, 1, 3, size, size, generator=generator)
    return {"vision_x": vision_x, "lang_x": lang_x, "attention_mask": attention_mask}


def describe(model: Flamingo) -> dict:
    """Every number our FlamingoConfig needs, read off the built reference model."""
    perceiver = model.perceiver
    attn, ff = perceiver.layers[0]
    blocks = [b for b in model.lang_encoder.gated_cross_attn_layers if b is not None]
    xattn = blocks[0]
    text_hidden = TEXT["hidden_size"]
    vision_heads = VISION["width"] // VISION["head_width"]
    return {
        "model_type": "flamingo",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": VISION["width"],
            "intermediate_size": int(VISION["width"] * VISION["mlp_ratio"]),
            "num_attention_heads": vision_heads,
            "num_hidden_layers": VISION["layers"],
            "image_size": VISION["image_size"],
            "patch_size": VISION["patch_size"],
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "text_config": {"model_type": "llama", **TEXT},
        "cross_attn_every_n_layers": CROSS_ATTN_EVERY_N_LAYERS,
        "perceiver_depth": len(perceiver.layers),
        "perceiver_heads": attn.heads,
        "perceiver_dim_head": attn.to_q.out_features // attn.heads,
        "perceiver_num_latents": perceiver.latents.shape[0],
        "perceiver_ff_mult": ff[1].out_features // VISION["width"],
        "cross_attn_heads": xattn.attn.heads,
        "cross_attn_dim_head": xattn.attn.to_q.out_features // xattn.attn.heads,
        "cross_attn_ff_mult": xattn.ff[1].out_features // text_hidden,
        # OpenFlamingo 2.0.1: text_time = cumsum(<image> locations), allowed where text_time == media_time, rows
        # with text_time == 0 zeroed: every token attends to the image of the latest <image> at or before it.
        "only_attend_previous": True,
        "use_media_placement_augmentation": False,
        "max_num_frames": None,  # 2.0.1 builds PerceiverResampler without frame embeddings
        "media_token_id": model.media_token_id,
        "endofchunk_token_id": model.eoc_token_id,
        "tie_word_embeddings": False,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "of2"
    parser.add_argument("--output", type=Path, default=default_out)
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = build_model()
    randomize(model, generator)
    inputs = make_inputs(generator)
    with torch.no_grad():
        output = model(vision_x=inputs["vision_x"], lang_x=inputs["lang_x"], attention_mask=inputs["attention_mask"])
    logits = output.logits.float()
    if not torch.isfinite(logits).all():
        raise SystemExit("reference logits are not finite")
    # How much the images matter: the same text with other images (0 would make the parity check blind to vision).
    with torch.no_grad():
        other = model(
            vision_x=torch.randn(inputs["vision_x"].shape, generator=generator),
            lang_x=inputs["lang_x"],
            attention_mask=inputs["attention_mask"],
        ).logits
    image_sensitivity = float((other - logits)[inputs["attention_mask"].bool()].abs().max())
    # Greedy generation (OpenFlamingo 2.0.1 caches the media; new tokens attend to the last image).
    with torch.no_grad():
        generated = model.generate(
            vision_x=inputs["vision_x"],
            lang_x=inputs["lang_x"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=MAX_NEW_TOKENS,
            num_beams=1,
            do_sample=False,
            eos_token_id=EOC,
            pad_token_id=PAD,
        )

    args.output.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state_dict, str(args.output / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(args.output / "inputs.safetensors"))
    save_file(
        {"logits": logits.contiguous(), "generated": generated.contiguous()}, str(args.output / "logits.safetensors")
    )
    meta = {
        "generator": "scripts/make_reference_fixtures.py",
        "seed": SEED,
        "versions": {
            "python": platform.python_version(),
            "open_flamingo": version("open-flamingo"),
            "open_clip_torch": version("open_clip_torch"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "safetensors": version("safetensors"),
            "einops": version("einops"),
            "einops_exts": version("einops-exts"),
        },
        "state_dict_layout": "open_flamingo 2.0.1 Flamingo.state_dict() (open_clip visual, aliases included)",
        "dtype": "float32",
        "flamingo_config": describe(model),
        "inputs": {
            "vision_x": list(inputs["vision_x"].shape),
            "lang_x": inputs["lang_x"].tolist(),
            "attention_mask": inputs["attention_mask"].tolist(),
        },
        "compare": "logits at positions where attention_mask == 1 (padded query rows are undefined)",
        "image_sensitivity": image_sensitivity,
        "generate": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "num_beams": 1,
            "do_sample": False,
            "eos_token_id": EOC,
            "pad_token_id": PAD,
            "use_cache": True,
        },
        "logits_abs_max": float(logits.abs().max()),
    }
    (args.output / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in args.output.iterdir())
    print(f"wrote {len(state_dict)} tensors, logits {tuple(logits.shape)}, {total / 1e6:.2f} MB to {args.output}")
    print(f"python {sys.version.split()[0]}, open_flamingo {meta['versions']['open_flamingo']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
