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

The model is built by the reference's own entry point, offline: `open_flamingo.create_model_and_transforms(...)`
with a tiny open_clip config registered by `open_clip.add_model_config` (QuickGELU as in OpenAI's weights,
`pretrained=None`), and a tiny `LlamaForCausalLM` and tokenizer saved to temporary dirs and read back with
`use_local_files=True`. The factory does everything it does for a released model: `output_tokens=True` on the
open_clip visual, `<|endofchunk|>` / `<image>` added as special tokens (and `<PAD>` when there is no pad token),
`resize_token_embeddings(len(tokenizer))`, `extend_instance(..., FlamingoLMMixin)` with the decoder-layer attribute
inferred from the class name (`model.layers`), gated cross-attention before every `cross_attn_every_n_layers`-th
layer, and the freezing. The tokenizer already holds the Flamingo tokens at the ids of the project's tiny tokenizer
(`<PAD>` 0, `<s>` 1, `</s>` 2, `<|endofchunk|>` 3, `<image>` 4; 128 entries, as the tiny LM), so the factory adds
none and the resize keeps 128 rows. The perceiver (depth 6, 8 heads x 64, 64 latents) and the gated
cross-attention blocks (8 heads x 64, FF x4) keep OpenFlamingo's hard-wired sizes. All weights are then redrawn at
O(1) scale (gates 0.5) so that every part moves the logits, the prompts are tokenized by the reference tokenizer
with left padding, and one forward pass and a greedy generation are saved with the full state dict (original keys,
aliases included).
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
from open_flamingo import Flamingo, create_model_and_transforms
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
OPEN_CLIP_NAME = "of2-tiny-vit"  # registered with open_clip.add_model_config
VISION = {"width": 8, "layers": 2, "head_width": 4, "mlp_ratio": 2.0, "patch_size": 8, "image_size": 32}
# open_clip builds a whole CLIP; 2.0.1's Flamingo keeps only `.visual`, so the text tower is dropped (smallest allowed).
OPEN_CLIP_TEXT = {"context_length": 4, "vocab_size": 8, "width": 8, "heads": 2, "layers": 1}
# The special tokens, at the ids of tests/fixtures/tiny-tokenizer and configs/*-tiny.json.
PAD, BOS, EOS, EOC, MEDIA, UNK = "<PAD>", "<s>", "</s>", "<|endofchunk|>", "<image>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, EOC, MEDIA, UNK]
# Character-level BPE over printable ASCII, plus merges up to the tiny LM's 128 entries.
MERGES = [
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te",
    "of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as",
]  # fmt: skip
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
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
CROSS_ATTN_EVERY_N_LAYERS = 2  # blocks before decoder layers 1 and 3
MAX_NEW_TOKENS = 8
# 3 images per sample. Row 0 starts with an image and has text between and after its images; row 1 is shorter
# (left-padded), has text before its first image (which sees no image under 2.0.1's attend-previous semantics) and
# uses only 2 of its 3 images (the third is a dummy, as when a batch mixes samples with different image counts).
PROMPTS = [
    "<image>a red cat<|endofchunk|><image>the dog<|endofchunk|><image>an ox is",
    "hi there<image>ox<|endofchunk|><image>a star",
]
NUM_IMAGES = 3


def write_open_clip_config(directory: Path):
    config = {"embed_dim": 8, "quick_gelu": True, "vision_cfg": VISION, "text_cfg": OPEN_CLIP_TEXT}
    path = directory / f"{OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def write_tokenizer(directory: Path) -> int:
    """A LLaMA-like character-level BPE (`encode` prepends `<s>`, as LLaMA's does; the factory reads the new
    tokens' ids as `encode(token)[-1]`) whose vocabulary already holds the Flamingo tokens and a pad token."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable[:95]:  # digits, letters, punctuation, space
        vocab[char] = len(vocab)
    for merge in MERGES:
        vocab[merge] = len(vocab)
    assert len(vocab) == TEXT["vocab_size"], len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in MERGES], unk_token=UNK))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[EOC, MEDIA],
    ).save_pretrained(str(directory))
    return len(vocab)


def build_model_and_tokenizer():
    """`open_flamingo.create_model_and_transforms`, offline, on the tiny towers written to a temporary dir."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_open_clip_config(workdir)
        vocab_size = write_tokenizer(workdir / "tokenizer")
        LlamaForCausalLM(LlamaConfig(**{**TEXT, "vocab_size": vocab_size})).save_pretrained(str(workdir / "llama"))
        model, _, tokenizer = create_model_and_transforms(
            clip_vision_encoder_path=OPEN_CLIP_NAME,
            clip_vision_encoder_pretrained=None,
            lang_encoder_path=str(workdir / "llama"),
            tokenizer_path=str(workdir / "tokenizer"),
            cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
            use_local_files=True,
        )
    # The factory found every token it adds already there: ids and the 128-row embeddings are unchanged.
    assert len(tokenizer) == TEXT["vocab_size"] == model.lang_encoder.get_input_embeddings().weight.shape[0]
    assert (model.eoc_token_id, model.media_token_id, tokenizer.pad_token_id) == (3, 4, TEXT["pad_token_id"])
    assert model.lang_encoder.decoder_layers_attr_name == "model.layers"
    return model.eval(), tokenizer


def build_model() -> Flamingo:
    """The reference model alone (scripts/make_training_checkpoint_fixture.py loads of2/model.safetensors into it)."""
    return build_model_and_tokenizer()[0]


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


def make_inputs(tokenizer, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"  # as OpenFlamingo's evaluation does
    encoded = tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    size = VISION["image_size"]
    vision_x = torch.randn(len(PROMPTS), NUM_IMAGES, 1, 3, size, size, generator=generator)
    return {"vision_x": vision_x, "lang_x": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def describe(model: Flamingo) -> dict:
    """Every number our FlamingoConfig needs, read off the built reference model."""
    perceiver = model.perceiver
    attn, ff = perceiver.layers[0]
    blocks = [b for b in model.lang_encoder.gated_cross_attn_layers if b is not None]
    xattn = blocks[0]
    lm_config = model.lang_encoder.config
    text_hidden = lm_config.hidden_size
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
        "text_config": {
            "model_type": "llama",
            **TEXT,
            "vocab_size": model.lang_encoder.get_input_embeddings().weight.shape[0],  # after the factory's resize
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
        # OpenFlamingo 2.0.1: text_time = cumsum(<image> locations), allowed where text_time == media_time, rows
        # with text_time == 0 zeroed: every token attends to the image of the latest <image> at or before it.
        "only_attend_previous": True,
        "use_media_placement_augmentation": False,
        "max_num_frames": None,  # 2.0.1 builds PerceiverResampler without frame embeddings
        "media_token_id": model.media_token_id,
        "endofchunk_token_id": model.eoc_token_id,
        "tie_word_embeddings": False,
    }


def generate(model: Flamingo, inputs: dict[str, torch.Tensor], use_cache: bool) -> torch.Tensor:
    """2.0.1's own `Flamingo.generate` (greedy). With the cache it keeps the media and lets the one-token steps
    attend to the last image; without it every step recomputes the media locations from the whole sequence."""
    with torch.no_grad():
        return model.generate(
            vision_x=inputs["vision_x"],
            lang_x=inputs["lang_x"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=MAX_NEW_TOKENS,
            num_beams=1,
            do_sample=False,
            eos_token_id=model.eoc_token_id,
            pad_token_id=TEXT["pad_token_id"],
            use_cache=use_cache,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "of2"
    parser.add_argument("--output", type=Path, default=default_out)
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model, tokenizer = build_model_and_tokenizer()
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
    # Greedy generation. Cached and uncached must agree (else the fixture would pin down a cache artefact).
    generated = generate(model, inputs, use_cache=True)
    if not torch.equal(generated, generate(model, inputs, use_cache=False)):
        raise SystemExit("2.0.1's cached and uncached greedy generation differ; pick other prompts")

    args.output.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state_dict, str(args.output / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(args.output / "inputs.safetensors"))
    save_file(
        {"logits": logits.contiguous(), "generated": generated.contiguous()}, str(args.output / "logits.safetensors")
    )
    meta = {
        "generator": "scripts/make_reference_fixtures.py",
        "built_by": (
            "open_flamingo.create_model_and_transforms(clip_vision_encoder_path='of2-tiny-vit' (open_clip."
            "add_model_config), clip_vision_encoder_pretrained=None, lang_encoder_path=<tmp llama>, tokenizer_path="
            f"<tmp tokenizer>, cross_attn_every_n_layers={CROSS_ATTN_EVERY_N_LAYERS}, use_local_files=True)"
        ),
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
        "state_dict_layout": "open_flamingo 2.0.1 Flamingo.state_dict() (open_clip visual, aliases included)",
        "dtype": "float32",
        "flamingo_config": describe(model),
        "tokenizer": {
            "prompts": PROMPTS,
            "padding_side": "left",
            "len": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "endofchunk_token_id": tokenizer.convert_tokens_to_ids(EOC),
            "media_token_id": tokenizer.convert_tokens_to_ids(MEDIA),
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
            "pad_token_id": TEXT["pad_token_id"],
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
