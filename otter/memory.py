"""Memory planner: how many parameters and bytes each part of a Flamingo/Otter model takes, from its config alone,
and whether (and how) it fits a set of devices.

    >>> from otter.memory import estimate
    >>> est = estimate("configs/otter-9b.json", dtype="bf16")
    >>> print(est.format_table())
    >>> print(est.fits("2x24GB").describe())

The model is built on the meta device (no memory, no weights), so the counts are exact for any decoder that
transformers knows. Bytes follow what `from_pretrained` really allocates:

- `dtype` (fp32 / fp16 / bf16) for every parameter, except that under fp16 the modules in the model's
  `_keep_in_fp32_modules` (vision tower, perceiver, gates) stay fp32, as transformers loads them;
- `quantization="int8"` (bitsandbytes LLM.int8): each quantised Linear weight takes 1 byte per element plus one fp32
  scale per output row; `"int4"` (bitsandbytes NF4/FP4): half a byte per element plus one fp32 absmax per block of
  64. Only the LM body is quantised: the vision tower, the perceiver, the cross-attention blocks and `lm_head` are
  skipped (`FlamingoPreTrainedModel._keep_in_fp32_modules` and `_quantization_skip_modules`), embeddings and norms
  are never quantised.

Buffers (rotary frequencies, position ids) and activations are not counted; `fits()` keeps a headroom on each device
for activations, the KV cache and the CUDA context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch
from accelerate.utils import convert_file_size_to_int
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from flamingo.configuration_flamingo import FlamingoConfig
from flamingo.modeling_flamingo import FlamingoForConditionalGeneration

from .configuration_otter import OtterConfig
from .modeling_otter import OtterForConditionalGeneration

logger = logging.get_logger(__name__)

PARTS = ("vision", "perceiver", "cross_attention", "lm_embeddings", "lm_layers", "lm_head")
PART_TITLES = {
    "vision": "vision tower (CLIP)",
    "perceiver": "perceiver resampler",
    "cross_attention": "gated cross-attention",
    "lm_embeddings": "LM input embeddings",
    "lm_layers": "LM decoder layers + norm",
    "lm_head": "LM output head",
}
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
QUANTIZATIONS = {
    None: None,
    "none": None,
    "int8": "int8",
    "8bit": "int8",
    "int4": "int4",
    "4bit": "int4",
    "nf4": "int4",
}
INT4_BLOCK_SIZE = 64  # bitsandbytes' 4-bit block size: one fp32 absmax per block


@dataclass
class PartEstimate:
    """Parameters and bytes of one part of the model; `quantized_params` of them sit in quantised Linear weights."""

    name: str
    params: int = 0
    bytes: int = 0
    quantized_params: int = 0


@dataclass
class Block:
    """A unit the planner never splits: the vision tower, the perceiver, the embeddings, one `FlamingoLayer` (decoder
    layer + its cross-attention block), the final norm, `lm_head`."""

    name: str
    bytes: int


@dataclass
class DeviceAssignment:
    device: str
    capacity: int | None
    blocks: list[str] = field(default_factory=list)
    bytes: int = 0


@dataclass
class FitPlan:
    """Where each block goes: the accelerators in order, then `cpu` / `disk` for what is left."""

    fits: bool
    total_bytes: int
    devices: list[DeviceAssignment]
    headroom: float
    dtype: str
    quantization: str | None

    @property
    def offloaded_bytes(self) -> int:
        return sum(d.bytes for d in self.devices if d.device in ("cpu", "disk"))

    def max_memory(self) -> dict:
        """A `max_memory` for `from_pretrained(device_map="auto", ...)` that reproduces this plan's capacities."""
        out = {}
        for index, device in enumerate(d for d in self.devices if d.device not in ("cpu", "disk")):
            out[index] = _format_gb(device.capacity).replace(" ", "")
        if any(d.device == "cpu" and d.blocks for d in self.devices):
            cpu = next(d for d in self.devices if d.device == "cpu")
            out["cpu"] = _format_gb(cpu.capacity if cpu.capacity is not None else cpu.bytes).replace(" ", "")
        return out

    def describe(self) -> str:
        accelerators = [d for d in self.devices if d.device not in ("cpu", "disk")]
        lines = []
        verdict = "fits" if self.fits else "does NOT fit"
        capacity = sum(d.capacity for d in accelerators)
        lines.append(
            f"{verdict}: {_format_gb(self.total_bytes)} of weights on {len(accelerators)} device(s) with "
            f"{_format_gb(capacity)} usable ({int(round(self.headroom * 100))}% kept free on each for activations, "
            "KV cache and the CUDA context)"
        )
        for device in self.devices:
            if not device.blocks:
                continue
            capacity_text = f" / {_format_gb(device.capacity)}" if device.capacity is not None else ""
            lines.append(
                f"  {device.device:>6}: {_format_gb(device.bytes)}{capacity_text}  {_summarise_blocks(device.blocks)}"
            )
        dtype = {"fp32": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}[self.dtype]
        args = ['device_map="auto"', f"max_memory={self.max_memory()}", f"dtype={dtype}"]
        if self.quantization == "int8":
            args.append("quantization_config=BitsAndBytesConfig(load_in_8bit=True)")
        elif self.quantization == "int4":
            args.append("quantization_config=BitsAndBytesConfig(load_in_4bit=True)")
        if any(d.device == "disk" and d.blocks for d in self.devices):
            args.append('offload_folder="offload"')
        lines.append("load with: from_pretrained(path, " + ", ".join(args) + ")")
        if not self.fits:
            over = self.offloaded_bytes
            lines.append(
                f"  {_format_gb(over)} would be offloaded to CPU/disk (slow); a smaller dtype or "
                "--quantization int8 / int4 needs less"
            )
        return "\n".join(lines)


@dataclass
class MemoryEstimate:
    """Parameters and bytes per part of a Flamingo/Otter model for one dtype and quantisation."""

    model_name: str
    dtype: str
    quantization: str | None
    parts: dict[str, PartEstimate]
    blocks: list[Block]
    tied_embeddings: bool

    @property
    def total_params(self) -> int:
        return sum(part.params for part in self.parts.values())

    @property
    def total_bytes(self) -> int:
        return sum(part.bytes for part in self.parts.values())

    def format_table(self) -> str:
        quantization = self.quantization or "none"
        header = f"{self.model_name}: dtype={self.dtype}, quantization={quantization}"
        rows = [("part", "parameters", "bytes", "")]
        for name in PARTS:
            part = self.parts[name]
            note = ""
            if name == "lm_head" and self.tied_embeddings:
                note = "tied to the input embeddings"
            elif part.quantized_params:
                note = f"{part.quantized_params / max(part.params, 1):.1%} of it quantised"
            rows.append((PART_TITLES[name], f"{part.params:,}", _format_gb(part.bytes), note))
        rows.append(("total", f"{self.total_params:,}", _format_gb(self.total_bytes), ""))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [header]
        for index, row in enumerate(rows):
            line = f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip()
            lines.append(line)
            if index == 0 or index == len(rows) - 2:
                lines.append("-" * (sum(widths) + 4))
        return "\n".join(lines)

    def fits(self, devices: str | list = "2x24GB", headroom: float = 0.1, cpu: str | int | None = None) -> FitPlan:
        """Place the blocks (never splitting a decoder layer from its cross-attention) on `devices` the way
        `device_map="auto"` balances them, keeping `headroom` of each device free. What does not fit goes to `cpu`
        (up to that size, when given) and then to disk. `devices`: "2x24GB", "24GB,12GB", "1x80GiB" or a list of
        sizes (GB = 10**9 bytes, GiB = 2**30, as accelerate's `max_memory` reads them)."""
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom: expected a fraction in [0, 1), got {headroom}")
        capacities = [int(size * (1 - headroom)) for size in parse_devices(devices)]
        assignments = [DeviceAssignment(f"gpu{index}", capacity) for index, capacity in enumerate(capacities)]
        pending = list(self.blocks)
        total = sum(block.bytes for block in pending)
        # As accelerate's balanced map: an even share plus the largest block, so no device ends up a block short.
        share = total // max(len(capacities), 1) + max((block.bytes for block in pending), default=0)
        for index, device in enumerate(assignments):
            limit = device.capacity if index == len(assignments) - 1 else min(device.capacity, share)
            while pending and device.bytes + pending[0].bytes <= limit:
                block = pending.pop(0)
                device.blocks.append(block.name)
                device.bytes += block.bytes
        fits = not pending
        cpu_capacity = convert_file_size_to_int(cpu) if cpu is not None else None
        cpu_device = DeviceAssignment("cpu", cpu_capacity)
        disk_device = DeviceAssignment("disk", None)
        for block in pending:
            target = cpu_device
            if cpu_capacity is not None and (disk_device.blocks or cpu_device.bytes + block.bytes > cpu_capacity):
                target = disk_device
            target.blocks.append(block.name)
            target.bytes += block.bytes
        return FitPlan(
            fits=fits,
            total_bytes=total,
            devices=[*assignments, cpu_device, disk_device],
            headroom=headroom,
            dtype=self.dtype,
            quantization=self.quantization,
        )


def parse_devices(devices: str | list) -> list[int]:
    """'2x24GB' -> [24e9, 24e9]; '24GB,12GB' -> [24e9, 12e9]; a list of sizes (ints or strings) as is."""
    if isinstance(devices, (list, tuple)):
        return [convert_file_size_to_int(size) for size in devices]
    sizes = []
    for item in str(devices).replace(" ", "").split(","):
        match = re.fullmatch(r"(?:(\d+)[x*])?(.+)", item)
        count = int(match.group(1) or 1) if match else 1
        try:
            size = convert_file_size_to_int(match.group(2) if match else item)
        except ValueError:
            size = -1
        if not match or size <= 0 or count < 1:
            raise ValueError(f"devices: expected sizes like '2x24GB', '24GB,12GB' or '1x80GiB', got {devices!r}")
        sizes.extend([size] * count)
    return sizes


def load_config(config: str | os.PathLike | dict | FlamingoConfig) -> FlamingoConfig:
    """A FlamingoConfig/OtterConfig from a config object, a dict, a `config.json` path or a checkpoint folder."""
    if isinstance(config, FlamingoConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r} (expected a config.json or a checkpoint folder)")
        with open(path) as handle:
            config = json.load(handle)
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a FlamingoConfig, a dict or a path, got {type(config).__name__}")
    config = dict(config)
    model_type = config.pop("model_type", "flamingo")
    if model_type not in ("otter", "flamingo"):
        raise ValueError(f"config: model_type must be 'otter' or 'flamingo', got {model_type!r}")
    config_class = OtterConfig if model_type == "otter" else FlamingoConfig
    return config_class(**config)


def estimate(
    config: str | os.PathLike | dict | FlamingoConfig,
    dtype: str | torch.dtype = "bf16",
    quantization: str | None = None,
) -> MemoryEstimate:
    """Parameters and bytes per part (vision, perceiver, cross-attention, LM embeddings / layers / head) of the
    model `config` describes, loaded in `dtype` (fp32, fp16, bf16) with `quantization` (None, "int8", "int4")."""
    config = load_config(config)
    dtype_name = _dtype_name(dtype)
    torch_dtype = DTYPES[dtype_name]
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of None, 'int8', 'int4', got {quantization!r}")
    quantization = QUANTIZATIONS[quantization]

    model_class = OtterForConditionalGeneration if isinstance(config, OtterConfig) else FlamingoForConditionalGeneration
    with torch.device("meta"):
        model = model_class(config)

    keep_fp32 = list(model._keep_in_fp32_modules or []) if torch_dtype == torch.float16 else []
    keep_fp32 += list(model._keep_in_fp32_modules_strict or []) if torch_dtype != torch.float32 else []
    keep_fp32_re = re.compile("|".join(f"(?:{pattern})" for pattern in keep_fp32)) if keep_fp32 else None
    skip_quantization = [*(model._keep_in_fp32_modules or []), *model._quantization_skip_modules]

    quantized_weights = {}
    if quantization is not None:
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear) and should_convert_module(module_name, skip_quantization):
                quantized_weights[f"{module_name}.weight"] = module.out_features

    input_embeddings = model.get_input_embeddings().weight
    output_embeddings = model.get_output_embeddings()
    output_weight = output_embeddings.weight if output_embeddings is not None else None
    tied = output_weight is not None and output_weight is input_embeddings
    lm_head_name = _module_name(model, output_embeddings) if output_embeddings is not None else None

    parts = {name: PartEstimate(name) for name in PARTS}
    block_bytes: dict[str, int] = {}
    for name, param in model.named_parameters():
        numel = param.numel()
        if name in quantized_weights:
            if quantization == "int8":
                size = numel + 4 * quantized_weights[name]
            else:
                size = math.ceil(numel / 2) + 4 * math.ceil(numel / INT4_BLOCK_SIZE)
        else:
            element_dtype = torch.float32 if keep_fp32_re is not None and keep_fp32_re.search(name) else torch_dtype
            element_dtype = element_dtype if param.is_floating_point() else param.dtype
            size = numel * element_dtype.itemsize
        part = parts[_part_of(name, param, input_embeddings, output_weight)]
        part.params += numel
        part.bytes += size
        if name in quantized_weights:
            part.quantized_params += numel
        block = _block_of(name, lm_head_name)
        block_bytes[block] = block_bytes.get(block, 0) + size

    blocks = [Block(name, size) for name, size in block_bytes.items()]
    model_name = config.model_type
    return MemoryEstimate(model_name, dtype_name, quantization, parts, blocks, tied)


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        if dtype not in names:
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        return names[dtype]
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype: expected one of fp32, fp16, bf16, got {dtype!r}")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(key, key)


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _part_of(name: str, param: nn.Parameter, input_embeddings, output_weight) -> str:
    if name.startswith("vision_encoder."):
        return "vision"
    if name.startswith("perceiver."):
        return "perceiver"
    if ".gated_cross_attn_layer." in name:
        return "cross_attention"
    if param is input_embeddings:
        return "lm_embeddings"
    if param is output_weight:
        return "lm_head"
    return "lm_layers"


_LAYER_RE = re.compile(r"^(lang_encoder\..*?\.\d+)\.(?:decoder_layer|gated_cross_attn_layer)\.")


def _block_of(name: str, lm_head_name: str | None) -> str:
    """The unsplittable unit a parameter belongs to, in forward order."""
    for prefix in ("vision_encoder", "perceiver"):
        if name.startswith(prefix + "."):
            return prefix
    match = _LAYER_RE.match(name)
    if match:
        return match.group(1)
    if lm_head_name is not None and name.startswith(lm_head_name + "."):
        return lm_head_name
    return name.rsplit(".", 1)[0]


def _summarise_blocks(blocks: list[str]) -> str:
    """'lang_encoder.model.layers.3', ... -> 'layers 3-17'; other blocks by their last name."""
    out, run = [], []

    def flush():
        if run:
            out.append(f"layers {run[0]}-{run[-1]}" if len(run) > 1 else f"layer {run[0]}")
            run.clear()

    for block in blocks:
        match = re.search(r"\.(\d+)$", block)
        if match and block.startswith("lang_encoder."):
            run.append(int(match.group(1)))
            continue
        flush()
        out.append(block.removeprefix("lang_encoder.").removeprefix("model."))
    flush()
    return ", ".join(out)


def _format_gb(size: int | None) -> str:
    if size is None:
        return "-"
    if size >= 10**9:
        return f"{size / 10**9:.2f} GB"
    if size >= 10**6:
        return f"{size / 10**6:.2f} MB"
    return f"{size / 10**3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    """`otter estimate --config configs/otter-9b.json --dtype bf16 --devices 2x24GB [--quantization int8]`"""
    parser = argparse.ArgumentParser(
        prog="otter estimate", description="Parameters and memory per part of a model, and whether it fits devices."
    )
    parser.add_argument("--config", required=True, help="a config.json or a checkpoint folder")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--quantization", default=None, choices=["int8", "int4"], help="bitsandbytes 8-/4-bit")
    parser.add_argument("--devices", default=None, help="accelerators, e.g. 2x24GB, 24GB,12GB, 1x80GiB")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of each device kept free (default 0.1)")
    parser.add_argument("--cpu", default=None, help="CPU RAM for offload, e.g. 64GB (the rest goes to disk)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        result = estimate(args.config, dtype=args.dtype, quantization=args.quantization)
        plan = result.fits(args.devices, headroom=args.headroom, cpu=args.cpu) if args.devices else None
    except (ValueError, FileNotFoundError, TypeError) as error:
        if args.debug:
            raise
        print(f"otter estimate: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        payload = {
            "model": result.model_name,
            "dtype": result.dtype,
            "quantization": result.quantization,
            "parts": {name: vars(part) for name, part in result.parts.items()},
            "total_params": result.total_params,
            "total_bytes": result.total_bytes,
        }
        if plan is not None:
            payload["fits"] = plan.fits
            payload["devices"] = [vars(device) for device in plan.devices if device.blocks]
        print(json.dumps(payload, indent=2))
    else:
        print(result.format_table())
        if plan is not None:
            print()
            print(plan.describe())
    return 0


__all__ = ["MemoryEstimate", "PartEstimate", "FitPlan", "estimate", "load_config", "parse_devices", "main"]
