"""Make the OpenFlamingo 0.0.2 (v1) reference fixtures in tests/fixtures/reference/of1/.

open-flamingo 0.0.2 is the v1 code behind the released OpenFlamingo-9B: text attends to the *next* image at
inference (`use_media_placement_augmentation=False`, so `attend_previous` is always False). It runs in its own
environment with the real reference code, never in the project's venv, and never imports this project's packages:

    python3 -m venv /work/refvenv-of1
    /work/refvenv-of1/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/refvenv-of1/bin/pip install transformers==4.28.1 open_clip_torch==2.20.0 einops einops-exts \
        sentencepiece pillow safetensors
    /work/refvenv-of1/bin/pip install --no-deps open-flamingo==0.0.2
    /work/refvenv-of1/bin/python scripts/make_reference_fixtures_of1.py

(0.0.2 lists training and evaluation packages (wandb, webdataset, datasets, ...) as dependencies that a forward
pass never imports, hence --no-deps. transformers 4.28 is the version OpenFlamingo-9B was released with: its LLaMA
keeps `rotary_emb.inv_freq` as a persistent buffer, as in the released checkpoint. open_clip_torch must be <= 2.22:
from 2.23 `ln_post` is applied to the patch tokens.)

Like the 2.0.1 script, this one goes through the reference's own entry point, offline:
`open_flamingo.create_model_and_transforms(...)` with a tiny open_clip config registered by
`open_clip.add_model_config` (QuickGELU, `pretrained=None`), a tiny `LlamaForCausalLM` and a small LLaMA-like
tokenizer saved to temporary dirs and read back with `use_local_files=True`. The factory adds `<|endofchunk|>`,
`<image>` and `<PAD>` to the tokenizer and resizes the embeddings, as it did for OpenFlamingo-9B. The perceiver
(depth 6, 8 heads x 64, 64 latents) and the gated cross-attention blocks (8 heads x 64, FF x4) keep 0.0.2's
hard-wired sizes. All weights are then redrawn at O(1) scale (gates 0.5) so that every part moves the logits, and
the prompts are tokenized by the reference tokenizer with left padding, as OpenFlamingo's evaluation does.
"""

import argparse
import json
import math
import platform
import string
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import open_clip
import torch
from open_flamingo import create_model_and_transforms
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
OPEN_CLIP_NAME = "of1-tiny-vit"  # registered with open_clip.add_model_config
VISION = {"width": 8, "layers": 2, "head_width": 4, "mlp_ratio": 2.0, "patch_size": 8, "image_size": 32}
# The open_clip text tower is never used by Flamingo but is part of v1's state dict (`vision_encoder` is the whole
# open_clip CLIP model there); keep it as small as open_clip allows.
OPEN_CLIP_TEXT = {"context_length": 4, "vocab_size": 8, "width": 8, "heads": 2, "layers": 1}
# transformers 4.28 LLaMA has no grouped-query attention: as many KV heads as heads.
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# As OpenFlamingo-9B (LLaMA-7B, one block before every 4th layer): one block, at layer index 3.
CROSS_ATTN_EVERY_N_LAYERS = 4
MAX_NEW_TOKENS = 8
# 3 images per sample. Row 0 has text before, between and after its images; row 1 is shorter (left-padded), starts
# with text before its first image and uses only 2 of its 3 images (the third is a dummy, as when a batch mixes
# samples with different image counts): under v1 semantics its text after the 2nd image sees nothing.
PROMPTS = ["<image>cat<|endofchunk|><image>dog<|endofchunk|><image>a", "hi<image>ox<|endofchunk|><image>ok"]
NUM_IMAGES = 3


def write_open_clip_config(directory: Path):
    config = {"embed_dim": 8, "quick_gelu": True, "vision_cfg": VISION, "text_cfg": OPEN_CLIP_TEXT}
    path = directory / f"{OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def write_tokenizer(directory: Path):
    """A LLaMA-like character-level BPE: `<unk>` 0, `<s>` 1, `</s>` 2, then printable ASCII; encode() prepends
    `<s>` (the factory reads the new tokens' ids as `encode(token)[-1]`); no pad token, so the factory adds
    `<PAD>`."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in string.printable[:95]:  # digits, letters, punctuation, space
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(str(directory))
    return len(vocab)


def build_model(workdir: Path):
    write_open_clip_config(workdir)
    vocab_size = write_tokenizer(workdir / "tokenizer")
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **TEXT)).save_pretrained(str(workdir / "llama"))
    model, _, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=OPEN_CLIP_NAME,
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=str(workdir / "llama"),
        tokenizer_path=str(workdir / "tokenizer"),
        cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
        use_local_files=True,
        use_media_placement_augmentation=False,  # v1 at inference: attend_previous is False
    )
    assert model.lang_encoder.use_media_placement_augmentation is False
    return model.eval(), tokenizer


@torch.no_grad()
def randomize(model: torch.nn.Module, generator: torch.Generator):
    """As in make_reference_fixtures.py: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1),
    embeddings and latents ~ N(0, 1), tanh gates at 0.5. Aliased parameters are drawn once. Buffers (LLaMA's
    `inv_freq`) are left as they are."""
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
        else:  # norm weights, open_clip's logit_scale
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))


def make_inputs(tokenizer, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"  # as OpenFlamingo's evaluation does
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    size = VISION["image_size"]
    vision_x = torch.randn(len(PROMPTS), NUM_IMAGES, 1, 3, size, size, generator=generator)
    return {"vision_x": vision_x, "lang_x": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def describe(model, tokenizer) -> dict:
    """Every number our FlamingoConfig needs, read off the built reference model."""
    perceiver = model.perceiver
    attn, ff = perceiver.layers[0]
    blocks = [b for b in model.lang_encoder.gated_cross_attn_layers if b is not None]
    xattn = blocks[0]
    lm_config = model.lang_encoder.config
    text_hidden = lm_config.hidden_size
    return {
        "model_type": "flamingo",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": VISION["width"],
            "intermediate_size": int(VISION["width"] * VISION["mlp_ratio"]),
            "num_attention_heads": VISION["width"] // VISION["head_width"],
            "num_hidden_layers": VISION["layers"],
            "image_size": VISION["image_size"],
            "patch_size": VISION["patch_size"],
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "model_type": "llama",
            **TEXT,
            "num_key_value_heads": lm_config.num_attention_heads,
            "vocab_size": model.lang_encoder.get_input_embeddings().weight.shape[0],  # resized by the factory
            "pad_token_id": lm_config.pad_token_id,
        },
        "cross_attn_every_n_layers": CROSS_ATTN_EVERY_N_LAYERS,
        "perceiver_depth": len(perceiver.layers),
        "perceiver_heads": attn.heads,
        "perceiver_dim_head": attn.to_q.out_features // attn.heads,
        "perceiver_num_latents": perceiver.latents.shape[0],
        "perceiver_ff_mult": ff[1].out_features // VISION["width"],
        "cross_attn_heads": xattn.attn.heads,
        "cross_attn_dim_head": xattn.attn.to_q.out_features // xattn.attn.heads,
        "cross_attn_ff_mult": xattn.ff[1].out_features // text_hidden,
        # OpenFlamingo 0.0.2 with use_media_placement_augmentation=False: attend_previous=False, i.e. text_time =
        # cumsum(<image>) + 1 off the <image> tokens, zeroed above the row's <image> count: plain text attends to
        # the NEXT image, an <image> token to its own, text after the row's last image to none.
        "only_attend_previous": False,
        "use_media_placement_augmentation": False,
        "max_num_frames": None,  # 0.0.2 builds PerceiverResampler without frame embeddings
        "media_token_id": model.media_token_id,
        "endofchunk_token_id": model.eoc_token_id,
        "tie_word_embeddings": False,
    }


def generate(model, inputs, use_cache: bool) -> torch.Tensor:
    """0.0.2's own `Flamingo.generate` (greedy). It takes no `use_cache`; transformers reads it from the LM's
    generation config."""
    model.lang_encoder.generation_config.use_cache = use_cache
    with torch.no_grad():
        return model.generate(
            vision_x=inputs["vision_x"],
            lang_x=inputs["lang_x"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=MAX_NEW_TOKENS,
            num_beams=1,
            do_sample=False,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "of1"
    parser.add_argument("--output", type=Path, default=default_out)
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer = build_model(Path(workdir))
    randomize(model, generator)
    inputs = make_inputs(tokenizer, generator)
    with torch.no_grad():
        output = model(vision_x=inputs["vision_x"], lang_x=inputs["lang_x"], attention_mask=inputs["attention_mask"])
    logits = output.logits.float()
    if not torch.isfinite(logits).all():
        raise SystemExit("reference logits are not finite")
    attended = inputs["attention_mask"].bool()
    # How much the images matter: the same text with other images (0 would make the parity check blind to vision).
    with torch.no_grad():
        other = model(
            vision_x=torch.randn(inputs["vision_x"].shape, generator=generator),
            lang_x=inputs["lang_x"],
            attention_mask=inputs["attention_mask"],
        ).logits
    image_sensitivity = float((other - logits)[attended].abs().max())
    # Greedy generation. 0.0.2's cached generate recomputes media_locations from the one new token, so new tokens
    # cross-attend to no image; without the cache they are text after the row's last <image>, which v1 semantics
    # also give no image. The two must agree (else the fixture would pin down a cache artefact).
    generated = generate(model, inputs, use_cache=True)
    generated_uncached = generate(model, inputs, use_cache=False)
    if not torch.equal(generated, generated_uncached):
        raise SystemExit("0.0.2's cached and uncached greedy generation differ; pick other prompts")
    generation_config = model.lang_encoder.generation_config

    args.output.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state_dict, str(args.output / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(args.output / "inputs.safetensors"))
    save_file(
        {"logits": logits.contiguous(), "generated": generated.contiguous()}, str(args.output / "logits.safetensors")
    )
    meta = {
        "generator": "scripts/make_reference_fixtures_of1.py",
        "seed": SEED,
        "versions": {
            "python": platform.python_version(),
            "open_flamingo": version("open-flamingo"),
            "open_clip_torch": version("open_clip_torch"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "safetensors": version("safetensors"),
            "einops": version("einops"),
            "einops_exts": version("einops-exts"),
        },
        "state_dict_layout": (
            "open_flamingo 0.0.2 Flamingo.state_dict(): the whole open_clip CLIP under vision_encoder. (visual.* and "
            "the unused text tower), perceiver.layers.{i}.{0,1}, the gated_cross_attn_layers alias, LLaMA "
            "rotary_emb.inv_freq buffers (persistent in transformers 4.28)"
        ),
        "dtype": "float32",
        "flamingo_config": describe(model, tokenizer),
        "tokenizer": {
            "prompts": PROMPTS,
            "padding_side": "left",
            "len": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
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
            "eos_token_id": model.eoc_token_id,
            "pad_token_id": generation_config.pad_token_id,
            "use_cache": True,
            "equals_uncached": True,
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
