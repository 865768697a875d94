"""Benchmark generate() of the "small" Otter (configs/otter-small.json, ~120M parameters) against transformers'
IdeficsForVisionText2Text built at matching sizes, fp32 on the CPU.

Workload: one prompt with 2 images and 64 text tokens by default (`--prompt-tokens`) (the <image> tokens included), 64 new tokens, greedy.
Each model is measured in its own subprocess so that its peak RSS is its own. Random weights: the figures are
about speed and memory, not quality. Prints one table with ratios against baselines measured in the same run.

    python scripts/benchmark_generate.py [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_CONFIG = REPO_ROOT / "configs" / "otter-small.json"
NUM_IMAGES = 2


def prompt_ids(media_token_id: int, end_of_chunk_id: int, vocab: int, length: int) -> torch.Tensor:
    """`<s> <image> text... <|endofchunk|> <image> text...` with `length` text tokens (plus 4 special ones)."""
    generator = torch.Generator().manual_seed(0)
    first = length // 2
    second = length - first
    text = torch.randint(100, vocab - 10, (first + second,), generator=generator).tolist()
    return torch.tensor([[1, media_token_id, *text[:first], end_of_chunk_id, media_token_id, *text[first:]]])


def build_ours(prompt_tokens: int):
    sys.path.insert(0, str(REPO_ROOT))
    from otter import OtterConfig, OtterForConditionalGeneration

    config = OtterConfig.from_json_file(str(SMALL_CONFIG))
    torch.manual_seed(0)
    model = OtterForConditionalGeneration(config).eval()
    ids = prompt_ids(config.media_token_id, config.endofchunk_token_id, config.text_config.vocab_size, prompt_tokens)
    size = config.vision_config.image_size
    vision_x = torch.randn(1, NUM_IMAGES, 1, 3, size, size, generator=torch.Generator().manual_seed(1))

    def generate(new_tokens: int, use_cache: bool):
        return model.generate(
            input_ids=ids,
            vision_x=vision_x,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
        )

    return model, generate


def build_idefics(prompt_tokens: int):
    """IDEFICS at the small Otter's sizes: LLaMA 512 x 12 layers, cross-attention every 4th layer, a 6-layer
    perceiver with 64 latents, a 6-layer ViT-B/32-like vision tower on 224 px images."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    ours = json.loads(SMALL_CONFIG.read_text())
    text, vision = ours["text_config"], ours["vision_config"]
    config = IdeficsConfig(
        vocab_size=32000,
        additional_vocab_size=4,
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        cross_layer_interval=ours["cross_attn_every_n_layers"],
        use_resampler=True,
        vision_config={
            "embed_dim": vision["hidden_size"],
            "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "num_attention_heads": vision["num_attention_heads"],
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": ours["perceiver_num_latents"],
            "resampler_depth": ours["perceiver_depth"],
            "resampler_n_heads": ours["perceiver_heads"],
            "resampler_head_dim": ours["perceiver_dim_head"],
        },
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(config).eval()
    media_token_id, end_of_chunk_id = 32001, 32000
    ids = prompt_ids(media_token_id, end_of_chunk_id, 32000, prompt_tokens)
    # Each text token attends to the latest image, as in Otter (IDEFICS' processor builds the same mask).
    latest_image = (ids == media_token_id).cumsum(-1)
    image_attention_mask = torch.nn.functional.one_hot(latest_image, NUM_IMAGES + 1)[..., 1:]
    size = vision["image_size"]
    pixel_values = torch.randn(1, NUM_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(1))

    def generate(new_tokens: int, use_cache: bool):
        return model.generate(
            input_ids=ids,
            pixel_values=pixel_values,
            image_attention_mask=image_attention_mask,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
        )

    return model, generate


def measure_floor(repeats: int) -> dict:
    """The matmuls alone of one cached decoding step: a 1-row `F.linear` through every LM, cross-attention and
    `lm_head` weight that a step reads (not the media key/value projection, which runs once per call). Memory
    bandwidth bounds this on a CPU; no decoder can beat it at fp32, so it shows how much room is left."""
    model, _ = build_ours(8)
    weights = [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("lang_encoder.") and not name.endswith(".to_kv")
    ]
    rows = {width: torch.randn(1, width) for width in {w.shape[1] for w in weights}}

    def one_step():
        for weight in weights:
            torch.nn.functional.linear(rows[weight.shape[1]], weight)

    with torch.inference_mode():
        one_step()  # warm-up
        step = min(_timed(lambda: [one_step() for _ in range(16)]) for _ in range(repeats)) / 16
    return {
        "parameters": sum(w.numel() for w in weights),
        "tokens_per_s": 1 / step,
        "first_token_s": float("nan"),
        "total_s": step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(which: str, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    if which == "floor":
        return measure_floor(repeats)
    build = build_ours if which.startswith("ours") else build_idefics
    model, generate = build(prompt_tokens)
    use_cache = not which.endswith("uncached")
    parameters = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        generate(2, use_cache)  # warm-up
        first_token = min(_timed(lambda: generate(1, use_cache)) for _ in range(repeats))
        total = min(_timed(lambda: generate(new_tokens, use_cache)) for _ in range(repeats))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "parameters": parameters,
        "tokens_per_s": new_tokens / total,
        "first_token_s": first_token,
        "total_s": total,
        "peak_rss_mb": peak_rss_mb,
    }


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}ms"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=64,
        help="text tokens in the prompt (<s>, 2x <image> and <|endofchunk|> come on top)",
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["ours", "ours-uncached", "idefics", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.prompt_tokens, args.new_tokens, args.repeats)))
        return

    results = {}
    for which in ("ours", "ours-uncached", "idefics", "floor"):
        command = [sys.executable, __file__, "--worker", which, "--new-tokens", str(args.new_tokens)]
        command += ["--repeats", str(args.repeats), "--prompt-tokens", str(args.prompt_tokens)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[which] = json.loads(output.strip().splitlines()[-1])

    ours = results["ours"]
    rows = [
        ("otter-flamingo, KV + media cache", "ours"),
        ("otter-flamingo, no cache", "ours-uncached"),
        ("transformers IDEFICS, cache", "idefics"),
        ("floor: a step's matmuls alone", "floor"),
    ]
    print(
        f"small config, fp32, CPU ({torch.get_num_threads()} threads), prompt {args.prompt_tokens} text tokens + "
        f"{NUM_IMAGES} images, {args.new_tokens} new tokens, greedy, best of {args.repeats}"
    )
    header = (
        f"| {'model':34} | {'params':>7} | {'tok/s':>7} | {'ours/this':>9} | {'first token':>11} | {'peak RSS':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for label, key in rows:
        r = results[key]
        print(
            f"| {label:34} | {r['parameters'] / 1e6:6.1f}M | {r['tokens_per_s']:7.1f} | "
            f"{ours['tokens_per_s'] / r['tokens_per_s']:8.2f}x | {_ms(r['first_token_s']):>11} | "
            f"{r['peak_rss_mb']:7.0f}MB |"
        )


if __name__ == "__main__":
    main()
