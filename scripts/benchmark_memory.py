"""Memory benchmark: low-memory loading, fp32 / bf16 / 8-bit / 4-bit resident memory and speed, quantised quality,
and activation memory of a training step with and without gradient checkpointing. CPU only; nothing is downloaded.

    .venv/bin/python scripts/benchmark_memory.py            # ~1.1B-parameter checkpoint, the full table
    .venv/bin/python scripts/benchmark_memory.py --quick    # a ~120M model everywhere (a minute or two)

Every measurement runs in a fresh subprocess, so peak RSS belongs to that one step:
- load: peak RSS (VmHWM, reset through /proc/self/clear_refs) of `from_pretrained` minus the RSS before it, divided
  by the checkpoint's bytes on disk; transformers builds the model on the meta device and reads the safetensors
  shards through mmap, so the target is < 1.3x;
- resident: RSS after loading minus RSS before; tokens/s: greedy `generate` of `--new-tokens` tokens after a prompt
  with one image (batch 1, KV cache on), after one warm-up call;
- quality: top-1 next-token agreement with fp32 on `--prompts` random prompts (one random image each), on a smaller
  model (`--quality-size`) to keep it short; the weights are random, so near-ties are far more common than in a
  trained model and agreement is a pessimistic figure;
- training step: bytes of tensors saved for backward (counted with `saved_tensors_hooks`, parameters excluded) and the
  peak RSS growth of one forward + backward, with and without `gradient_checkpointing_enable()`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SIZES = {
    # ~1.1B: LLaMA-shaped LM (hidden 2048, 16 layers) + a small CLIP (otter-small's), cross-attention every 4 layers.
    "1b": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16},
    # ~120M: configs/otter-small.json as is.
    "small": {},
}


# ----- helpers that run in the children -----------------------------------------------------------------------------


def status(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in bytes: VmRSS (all resident pages), RssAnon (anonymous: the process's
    own memory), RssFile (file pages mapped in, e.g. safetensors shards read through mmap), VmHWM (peak VmRSS)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss() -> int:
    return status("VmRSS")


class AnonPeak:
    """Samples RssAnon every 2 ms in a thread: the kernel keeps no peak of anonymous memory alone."""

    def __init__(self):
        import threading

        self.peak = status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, status("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status("RssAnon"))


def peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def make_config(size: str):
    from otter.memory import load_config

    raw = json.loads((REPO / "configs" / "otter-small.json").read_text())
    raw["text_config"].update(SIZES[size])
    if "num_attention_heads" in SIZES[size]:
        raw["text_config"]["num_key_value_heads"] = SIZES[size]["num_attention_heads"]
    return load_config(raw)


def open_gates_and_scale(model):
    """Random weights with transformers' std 0.02, except: gates open (1.0) and unit-scale vision, perceiver and
    cross-attention weights, so the images change the text (as in a trained model)."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            for_images = name.startswith(("vision_encoder", "perceiver")) or "gated_cross_attn_layer" in name
            if for_images and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5)
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(1.0)
    return model


def write_checkpoint(size: str, path: Path, dtype: str, seed: int = 0):
    """A random checkpoint (safetensors shards of <= 1GB) written without ever holding two copies of the weights."""
    import torch

    from otter import OtterForConditionalGeneration

    torch.manual_seed(seed)
    config = make_config(size)
    with torch.device("meta"):
        model = OtterForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("latents"):
                param.normal_()
            elif param.dim() > 1:
                param.normal_(std=0.02)
            elif "norm" in name or "layernorm" in name or "layer_norm" in name:
                param.fill_(1.0) if name.endswith("weight") else param.zero_()
            else:
                param.zero_()
        for name, buffer in model.named_buffers():
            if "position_ids" in name:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    open_gates_and_scale(model)
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.save_pretrained(path, max_shard_size="1GB")


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def prompt_inputs(config, batch: int, length: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    ids = torch.randint(10, min(vocab, 32000), (batch, length), generator=generator)
    ids[:, 0] = config.text_config.bos_token_id
    ids[:, 1] = config.media_token_id
    size = config.vision_config.image_size
    images = torch.randn(batch, 1, 1, 3, size, size, generator=generator)
    return ids, images


def load_kwargs(mode: str) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    if mode == "fp32":
        return {"dtype": torch.float32}
    if mode == "bf16":
        return {"dtype": torch.bfloat16}
    if mode == "int8":
        return {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    if mode == "int4":
        return {
            "dtype": torch.bfloat16,
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
        }
    raise ValueError(mode)


def weight_bytes(model) -> int:
    """Bytes of the model's tensors: parameters, buffers, and bitsandbytes' quantisation scales."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.numel() * tensor.element_size()
        scales = getattr(tensor, "SCB", None)  # LLM.int8: one fp32 scale per output row
        if scales is not None:
            total += scales.numel() * scales.element_size()
        state = getattr(tensor, "quant_state", None)  # 4-bit: one absmax per block, plus the code table
        if state is not None:
            for extra in (state.absmax, state.code):
                total += extra.numel() * extra.element_size() if extra is not None else 0
    return total


def child_load(args) -> dict:
    import torch

    from otter import OtterForConditionalGeneration

    torch.set_num_threads(args.threads)
    ids, images = prompt_inputs(make_config("small"), 1, 32, seed=1)  # (ids < 32000, 224 px: fit every size)
    before, before_anon = rss(), status("RssAnon")
    reset_peak_rss()
    start = time.perf_counter()
    with AnonPeak() as anon:
        model = OtterForConditionalGeneration.from_pretrained(args.checkpoint, **load_kwargs(args.mode)).eval()
    out = {
        "load_seconds": time.perf_counter() - start,
        "load_peak": peak_rss() - before,
        "load_peak_anon": anon.peak - before_anon,
        "after_load": rss() - before,
        "weights": weight_bytes(model),
    }
    if args.new_tokens:
        kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
        # The first call touches every weight (mmap pages come in), so the resident size is measured after it.
        model.generate(input_ids=ids, vision_x=images, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        out["first_use_peak"] = peak_rss() - before
        out["resident"] = rss() - before
        out["resident_anon"] = status("RssAnon") - before_anon
        start = time.perf_counter()
        tokens = model.generate(input_ids=ids, vision_x=images, **kwargs)
        out["tokens_per_second"] = (tokens.shape[1] - ids.shape[1]) / (time.perf_counter() - start)
    return out


def child_quality(args) -> dict:
    import torch

    from otter import OtterForConditionalGeneration

    torch.set_num_threads(args.threads)
    first = OtterForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32)
    ids, images = prompt_inputs(first.config, args.prompts, 24, seed=7)
    del first
    top1, out = {}, {}
    for mode in ("fp32", "bf16", "int8", "int4"):
        model = OtterForConditionalGeneration.from_pretrained(args.checkpoint, **load_kwargs(mode)).eval()
        chunks = []
        with torch.no_grad():
            for start in range(0, args.prompts, 20):
                logits = model(input_ids=ids[start : start + 20], vision_x=images[start : start + 20]).logits
                chunks.append(logits[:, -1].float().argmax(-1))
        top1[mode] = torch.cat(chunks)
        out[mode] = float((top1[mode] == top1["fp32"]).float().mean())
        del model
    return out


def child_train(args) -> dict:
    import torch

    from otter import OtterForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = OtterForConditionalGeneration(make_config(args.size)).train()
    open_gates_and_scale(model)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    ids, images = prompt_inputs(model.config, args.batch, args.length, seed=3)
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in params and tensor.device.type != "meta":
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    before = rss()
    reset_peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, vision_x=images, labels=ids).loss
    saved_bytes = sum(saved.values())
    loss.backward()
    return {"saved_for_backward": saved_bytes, "step_peak": peak_rss() - before, "loss": float(loss)}


# ----- the parent ---------------------------------------------------------------------------------------------------


def run_child(*argv: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", *argv]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"child failed: {' '.join(argv)}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if abs(size) >= 1e8 else f"{size / 1e6:.1f} MB"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b", choices=sorted(SIZES), help="model for load / resident / speed")
    parser.add_argument("--quality-size", default="small", choices=sorted(SIZES), help="model for top-1 agreement")
    parser.add_argument("--train-size", default="small", choices=sorted(SIZES), help="model for the training step")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="training step batch")
    parser.add_argument("--length", type=int, default=256, help="training step sequence length")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="use the ~120M model everywhere")
    parser.add_argument("--results", default=None, help="also write the raw numbers to this JSON file")
    parser.add_argument("--render", default=None, help="print the tables of a --results file and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "write":
            write_checkpoint(args.size, Path(args.checkpoint), args.dtype)
            print(json.dumps({"bytes": checkpoint_bytes(Path(args.checkpoint))}))
        else:
            print(json.dumps({"load": child_load, "quality": child_quality, "train": child_train}[args.child](args)))
        return 0

    if args.render:
        render(json.loads(Path(args.render).read_text()))
        return 0
    if args.quick:
        args.size = "small"
    common = ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="otter-bench-") as workdir:
        checkpoints = {}
        for dtype in ("fp32", "bf16"):
            path = Path(workdir) / f"{args.size}-{dtype}"
            info = run_child("write", "--size", args.size, "--checkpoint", str(path), "--dtype", dtype)
            checkpoints[dtype] = (path, info["bytes"])
            print(f"wrote {path.name}: {gb(info['bytes'])}", file=sys.stderr, flush=True)
        if args.quality_size == args.size:
            quality_checkpoint = checkpoints["fp32"][0]
        else:
            quality_checkpoint = Path(workdir) / f"{args.quality_size}-fp32"
            run_child("write", "--size", args.quality_size, "--checkpoint", str(quality_checkpoint), "--dtype", "fp32")

        runs = {}
        for mode, source in (("fp32", "fp32"), ("bf16", "bf16"), ("int8", "bf16"), ("int4", "bf16")):
            path, _ = checkpoints[source]
            runs[mode] = run_child(
                "load", "--checkpoint", str(path), "--mode", mode, "--new-tokens", str(args.new_tokens), *common
            )
            print(f"{mode}: {runs[mode]}", file=sys.stderr, flush=True)
        converted = run_child(
            "load", "--checkpoint", str(checkpoints["fp32"][0]), "--mode", "bf16", "--new-tokens", "0", *common
        )
        quality = run_child("quality", "--checkpoint", str(quality_checkpoint), "--prompts", str(args.prompts), *common)
        print(f"quality: {quality}", file=sys.stderr, flush=True)
        train = {}
        for flag in (0, 1):
            train[flag] = run_child(
                "train",
                "--size",
                args.train_size,
                "--checkpointing",
                str(flag),
                "--batch",
                str(args.batch),
                "--length",
                str(args.length),
                *common,
            )
            print(f"train checkpointing={flag}: {train[flag]}", file=sys.stderr, flush=True)

    results = {
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "checkpoint", "mode", "dtype")},
        "checkpoint_bytes": {dtype: size for dtype, (_, size) in checkpoints.items()},
        "runs": runs,
        "converted": converted,
        "quality": quality,
        "train": {str(flag): value for flag, value in train.items()},
    }
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=2))
    render(results)
    return 0


def render(results: dict):
    """Print the tables from the raw numbers (`--results FILE` saves them; `--render FILE` prints them again)."""
    from otter.memory import estimate

    args = argparse.Namespace(**results["args"])
    runs, converted, quality = results["runs"], results["converted"], results["quality"]
    without, with_gc = results["train"]["0"], results["train"]["1"]
    fp32_bytes, bf16_bytes = results["checkpoint_bytes"]["fp32"], results["checkpoint_bytes"]["bf16"]
    total_params = estimate(make_config(args.size), dtype="fp32").total_params
    print(f"\nModel: {args.size} ({total_params / 1e9:.2f}B parameters), {args.threads} CPU threads, torch CPU.\n")
    print("Loading: growth of peak RSS (all pages, mmap-ed shards included) and of peak anonymous memory during")
    print("from_pretrained, and of peak RSS until a first generate has used every weight, over checkpoint bytes:\n")
    rows = [
        (
            "checkpoint -> loaded as",
            "checkpoint",
            "load peak RSS",
            "ratio",
            "load peak anon",
            "ratio",
            "peak RSS to first use",
            "ratio",
            "load time",
        )
    ]
    for label, run, size in (
        ("fp32 -> fp32", runs["fp32"], fp32_bytes),
        ("bf16 -> bf16", runs["bf16"], bf16_bytes),
        ("fp32 -> bf16", converted, fp32_bytes),
        ("bf16 -> int8", runs["int8"], bf16_bytes),
        ("bf16 -> int4", runs["int4"], bf16_bytes),
    ):
        first_use = run.get("first_use_peak")
        rows.append(
            (
                label,
                gb(size),
                gb(run["load_peak"]),
                ratio(run["load_peak"], size),
                gb(run["load_peak_anon"]),
                ratio(run["load_peak_anon"], size),
                gb(first_use) if first_use is not None else "-",
                ratio(first_use, size) if first_use is not None else "-",
                f"{run['load_seconds']:.1f} s",
            )
        )
    print(table(rows))

    base = runs["fp32"]
    rows = [
        (
            "mode",
            "weights",
            "vs fp32",
            "RSS",
            "of it anon",
            "tokens/s",
            "vs fp32",
            f"top-1 = fp32 ({args.quality_size})",
        )
    ]
    for mode in ("fp32", "bf16", "int8", "int4"):
        run = runs[mode]
        rows.append(
            (
                mode if mode in ("fp32", "bf16") else f"{mode} (bitsandbytes CPU)",
                gb(run["weights"]),
                ratio(run["weights"], base["weights"]),
                gb(run["resident"]),
                gb(run["resident_anon"]),
                f"{run['tokens_per_second']:.2f}",
                ratio(run["tokens_per_second"], base["tokens_per_second"]),
                f"{quality[mode]:.1%}",
            )
        )
    print(
        "\nWeights held (tensor bytes, quantisation scales included); RSS growth once every weight was used (after a "
        f"first generate); greedy speed ({args.new_tokens} new tokens, batch 1); top-1 next-token agreement with "
        f"fp32 on {args.prompts} random prompts:\n"
    )
    print(table(rows))

    print(
        f"\nTraining step ({args.train_size}, batch {args.batch} x {args.length} tokens, fp32, Otter's trainable set):\n"
    )
    print(
        table(
            [
                ("gradient checkpointing", "saved for backward", "vs off", "peak RSS growth of the step", "vs off"),
                ("off", gb(without["saved_for_backward"]), "1.00x", gb(without["step_peak"]), "1.00x"),
                (
                    "on",
                    gb(with_gc["saved_for_backward"]),
                    ratio(with_gc["saved_for_backward"], without["saved_for_backward"]),
                    gb(with_gc["step_peak"]),
                    ratio(with_gc["step_peak"], without["step_peak"]),
                ),
            ]
        )
    )
    print(f"\nloss with / without checkpointing: {with_gc['loss']:.6f} / {without['loss']:.6f}")


if __name__ == "__main__":
    sys.exit(main())
