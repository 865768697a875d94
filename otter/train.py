"""Instruction-tune Otter / OpenFlamingo on MIMIC-IT data with accelerate.

    python -m otter.train --model MODEL_DIR --mimicit-yaml data.yaml --output-dir runs/x
    accelerate launch --config_file configs/accelerate/ddp.yaml -m otter.train --model ... (same flags)

What trains is chosen by `--train` groups (cross-attention, perceiver, embeddings, lm_head, LM body, vision tower);
AdamW decays the cross-attention weights only (not gates, norms or biases). Checkpoints (`--save-steps`) are
complete (trainable weights, optimizer, LR schedule, every process's RNG state, the data position) and atomic
(written to `checkpoint-N.tmp`, then renamed); `--resume-from-checkpoint` continues the same loss curve.

Errors a user can fix (a missing file, a bad model path, a malformed data record, conflicting options) print one line
and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, set_seed

logger = get_logger(__name__, log_level="INFO")

TRAIN_GROUPS = ("xattn", "perceiver", "embeddings", "lm_head", "lm", "vision")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_WEIGHTS = "trainable.safetensors"
TRAINER_STATE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
# Arguments a resumed run must share with the run that wrote the checkpoint (the data order depends on them).
RESUME_INVARIANTS = ("seed", "batch_size", "gradient_accumulation_steps", "num_processes", "max_frames", "max_length")
USAGE_ERROR = 2


# ----- arguments ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otter train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("model, data and output")
    group.add_argument("--model", required=True, help="HF model directory or Hub id, or a config JSON (random init)")
    group.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: --model)")
    group.add_argument("--mimicit-yaml", type=Path, help="mixture YAML of MIMIC-IT datasets")
    group.add_argument("--instructions", type=Path, help="an instruction JSON (instead of --mimicit-yaml)")
    group.add_argument("--images", type=Path, help="its images JSON or parquet")
    group.add_argument("--train-config", type=Path, help="its train-config JSON (default: every instruction id)")
    group.add_argument(
        "--task-type",
        choices=("image", "video", "in_context", "text"),
        default="image",
        help="sample layout of --instructions (YAML groups set it per dataset)",
    )
    group.add_argument("--output-dir", type=Path, required=True)
    group.add_argument("--max-length", type=int, default=2048, help="truncate longer samples (tokens)")
    group.add_argument("--max-frames", type=int, help="resample videos to at most this many frames (default: config)")
    group.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    group.add_argument("--skip-bad-records", action="store_true", help="log and count bad records instead of failing")
    group.add_argument("--validate-data", action="store_true", help="decode every image before training")

    group = parser.add_argument_group("schedule")
    group.add_argument("--batch-size", type=int, default=4, help="samples per process per micro-batch")
    group.add_argument("--gradient-accumulation-steps", type=int, default=1)
    group.add_argument("--epochs", type=int, default=1)
    group.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    group.add_argument("--lr", type=float, default=1e-4)
    group.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default="constant")
    warmup = group.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-steps", type=int, default=0)
    warmup.add_argument("--warmup-ratio", type=float, help="warmup as a fraction of the optimizer steps")
    group.add_argument("--weight-decay", type=float, default=0.1, help="on cross-attention weights only")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    group.add_argument("--adam-beta2", type=float, default=0.999)

    group = parser.add_argument_group("what trains")
    group.add_argument(
        "--train",
        nargs="+",
        choices=TRAIN_GROUPS,
        help="parameter groups to train (default: from the config: xattn, perceiver, plus embeddings / lm_head / "
        "lm / vision as its train_* and freeze_* fields say)",
    )
    group.add_argument(
        "--mask-lm-head",
        action="store_true",
        help="embeddings and lm_head only update the rows of <image>, <|endofchunk|> and <answer>",
    )
    group.add_argument("--lora", action="store_true", help="LoRA adapters on the language model (needs peft)")
    group.add_argument("--lora-rank", type=int, default=16)
    group.add_argument("--lora-alpha", type=int, default=32)
    group.add_argument("--lora-dropout", type=float, default=0.0)
    group.add_argument(
        "--lora-target-modules",
        default=r".*decoder_layer\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
        help="regex of the LM modules that get adapters",
    )

    group = parser.add_argument_group("precision and reproducibility")
    group.add_argument("--gradient-checkpointing", action="store_true")
    group.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="default: accelerate's config")
    group.add_argument("--seed", type=int, default=42)

    group = parser.add_argument_group("saving and logging")
    group.add_argument("--save-steps", type=int, default=0, help="checkpoint every N optimizer steps (0: at the end)")
    group.add_argument("--save-total-limit", type=int, help="keep only the newest N checkpoints")
    group.add_argument("--resume-from-checkpoint", help="a checkpoint directory, or 'latest' in --output-dir")
    group.add_argument("--save-hf-model", action="store_true", help="also save the full model (save_pretrained)")
    group.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none")
    group.add_argument("--logging-steps", type=int, default=1, help="log metrics every N optimizer steps")
    group.add_argument("--no-progress-bar", action="store_true")
    group.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def _rank() -> tuple[int, int]:
    """This process's rank and the number of processes, as `accelerate launch` / torchrun set them."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def print_error(message: str, every_rank: bool = False) -> None:
    """`otter train: error: MESSAGE` on stderr, from the main process; with `every_rank`, the other processes print
    it too, after their rank (an error one process alone hits, such as a bad image in its shard)."""
    rank, world_size = _rank()
    if rank != 0 and not every_rank:
        return
    where = f"[rank {rank}/{world_size}] " if rank != 0 else ""
    print(f"otter train: error: {where}{message}", file=sys.stderr, flush=True)


class ArgumentError(ValueError):
    """A missing file or an unusable option: every process finds the same, so the main one reports it."""


def check_paths(args: argparse.Namespace) -> None:
    """Raise an `ArgumentError` for a model, tokenizer or data file that does not exist (before minutes of loading)."""
    from otter.cli import is_missing_model

    if is_missing_model(args.model):
        raise ArgumentError(
            f"model not found: {args.model} (expected an HF model directory, a Hub id or a config JSON)"
        )
    if args.tokenizer is not None and is_missing_model(args.tokenizer):
        raise ArgumentError(f"tokenizer not found: {args.tokenizer} (expected a tokenizer directory or a Hub id)")
    if args.tokenizer is None and Path(args.model).is_file():
        raise ArgumentError(f"--model {args.model} is a config (random init): give the tokenizer with --tokenizer")
    for option in ("mimicit_yaml", "instructions", "images", "train_config"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            raise ArgumentError(f"--{option.replace('_', '-')} file not found: {path}")


def error_line(error: BaseException) -> str:
    """The one line that says what went wrong. A DataLoader worker's exception is re-raised by torch with the
    worker's whole traceback as its message: its last line is the error."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and "in DataLoader worker" in lines[0]:
        return re.sub(r"^[\w.]+: ", "", lines[-1], count=1)  # drop the `package.module.ErrorClass: ` of the traceback
    return lines[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: conflicting options print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str):
        print_error(message)  # every process sees the same arguments: the main one says it
        raise SystemExit(USAGE_ERROR)

    if args.mimicit_yaml is None and args.instructions is None:
        fail("give --mimicit-yaml or --instructions (with --images unless --task-type text)")
    if args.mimicit_yaml is not None and args.instructions is not None:
        fail("--mimicit-yaml and --instructions are alternatives")
    if args.instructions is not None and args.images is None and args.task_type != "text":
        fail(f"--task-type {args.task_type} needs --images")
    for name in ("batch_size", "gradient_accumulation_steps", "epochs", "logging_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        fail("--max-steps must be at least 1")
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        fail("--warmup-ratio must be in [0, 1)")
    if args.lora and args.train and "lm" in args.train:
        fail("--lora trains adapters instead of the LM body: drop 'lm' from --train")
    if args.report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            fail("--report-to tensorboard needs tensorboard: pip install 'otter-flamingo[train]'")
    if args.report_to == "wandb":
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            fail("--report-to wandb needs wandb, which the train extra leaves out: pip install wandb")
    return args


# ----- model -------------------------------------------------------------------------------------------------------


def load_model(name_or_path: str):
    """An Otter/Flamingo model from a directory or Hub id, or a fresh random one from a config JSON file."""
    from transformers import AutoModelForImageTextToText

    import flamingo
    import otter  # registers the Auto classes

    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".json":
        model_type = json.loads(path.read_text()).get("model_type")
        config_class, model_class = {
            "otter": (otter.OtterConfig, otter.OtterForConditionalGeneration),
            "flamingo": (flamingo.FlamingoConfig, flamingo.FlamingoForConditionalGeneration),
        }.get(model_type, (None, None))
        if config_class is None:
            raise ValueError(f"{path}: model_type must be 'otter' or 'flamingo', got {model_type!r}")
        return model_class(config_class.from_json_file(str(path)))
    return AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch.float32)


def parameter_groups(model) -> dict[str, list[str]]:
    """Every parameter name of a Flamingo/Otter model, by `--train` group (plus "unused": parameters the forward
    pass never touches, which never train; DDP would wait forever for their gradients)."""
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    lm_head = output.weight if output is not None else None
    groups: dict[str, list[str]] = {name: [] for name in (*TRAIN_GROUPS, "unused")}
    for name, param in model.named_parameters():
        if "gated_cross_attn_layer" in name:
            groups["xattn"].append(name)
        elif name.startswith("perceiver."):
            groups["perceiver"].append(name)
        elif param is embeddings:
            groups["embeddings"].append(name)
        elif lm_head is not None and param is lm_head:
            groups["lm_head"].append(name)
        elif name.startswith("vision_encoder."):
            # CLIP's post_layernorm is not used: Flamingo takes the patch tokens before it.
            groups["unused" if ".post_layernorm." in name else "vision"].append(name)
        elif name.startswith("lang_encoder."):
            groups["lm"].append(name)
        else:
            raise ValueError(f"parameter {name!r} belongs to no training group")
    return groups


def default_train_groups(config) -> list[str]:
    groups = ["xattn", "perceiver"]
    if getattr(config, "train_embeddings", True):
        groups.append("embeddings")
    if getattr(config, "train_lm_head", False):
        groups.append("lm_head")
    if not getattr(config, "freeze_lang_encoder", True):
        groups.append("lm")
    if not getattr(config, "freeze_vision_encoder", True):
        groups.append("vision")
    return groups


def configure_trainable(model, groups: Sequence[str], mask_rows: Sequence[int] | None = None) -> dict[str, int]:
    """Train exactly the parameters of `groups` (requires_grad), freeze the rest. With `mask_rows`, the embeddings
    and the lm_head only get gradients on those vocabulary rows (a gradient hook zeroes the others). Returns the
    number of trainable parameters per group."""
    unknown = set(groups) - set(TRAIN_GROUPS)
    if unknown:
        raise ValueError(f"unknown training groups {sorted(unknown)}; choose from {TRAIN_GROUPS}")
    by_group = parameter_groups(model)
    selected = {name for group in groups for name in by_group[group]}
    counts = dict.fromkeys(groups, 0)
    named = dict(model.named_parameters())
    for name, param in named.items():
        param.requires_grad_(name in selected)
    for group in groups:
        counts[group] = sum(named[name].numel() for name in by_group[group])
    if mask_rows is not None:
        for group in ("embeddings", "lm_head"):
            if group in groups:
                for name in by_group[group]:
                    _mask_gradient_rows(named[name], mask_rows)
    return counts


def _mask_gradient_rows(param: torch.nn.Parameter, rows: Sequence[int]) -> None:
    keep = torch.zeros(param.shape[0], 1, dtype=torch.bool)
    keep[list(rows)] = True

    def hook(grad):
        return grad * keep.to(device=grad.device, dtype=grad.dtype)

    param.register_hook(hook)


def apply_lora(model, args):
    """Wrap the model with peft LoRA adapters on the LM modules matching `--lora-target-modules`, keeping the
    `--train` groups trainable next to the adapters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("--lora needs peft: pip install 'otter-flamingo[train]'") from error
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
    )
    peft_model = get_peft_model(model, config)
    prefix = "base_model.model."
    for name, param in peft_model.named_parameters():
        if name.startswith(prefix) and name[len(prefix) :] in trainable:
            param.requires_grad_(True)
    return peft_model


def build_optimizer(model, lr: float, weight_decay: float, beta2: float = 0.999) -> torch.optim.AdamW:
    """AdamW; weight decay only on the gated cross-attention weights (not their gates, norms or biases)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_xattn = "gated_cross_attn_layer" in name
        is_weight = param.dim() >= 2 and leaf == "weight" and "norm" not in name and "gate" not in leaf
        (decay if in_xattn and is_weight else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, beta2))


class Schedule:
    """LR multiplier: linear warmup, then constant, linear decay to 0, or cosine decay to 0."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown LR schedule {kind!r}")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ----- state and checkpoints ---------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The loop's position, saved in every checkpoint: optimizer steps done, and where in which epoch this
    process's batch list continues."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    skipped_records: int = 0
    invariants: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`checkpoint-N`, never `.tmp`), oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            suffix = path.name[len(CHECKPOINT_PREFIX) :]
            if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found)


def resolve_checkpoint(value: str, output_dir: Path) -> Path | None:
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(value)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})")
    return path


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the lines of `path` (metrics.jsonl) up to optimizer step `step`, the step a run resumes at: a run
    killed after its last checkpoint logged steps that the resumed run replays, and must not log twice. A line cut
    short by the kill is dropped too. Atomic (a temporary file, then a rename). Returns the number of lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            logged_step = json.loads(line)["step"]
            keep = logged_step <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    return dropped


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and loads complete checkpoints through `accelerator.save_state` / `load_state`, so DDP, FSDP and
    DeepSpeed shard the optimizer their own way. For single-process and DDP runs the model part holds only the
    trainable parameters (`trainable.safetensors`), not the frozen billions."""

    def __init__(self, accelerator: Accelerator, model, trainable_names: set[str], output_dir: Path):
        self.accelerator = accelerator
        self.model = model
        self.trainable_names = trainable_names
        self.output_dir = output_dir
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        unwrapped = self.accelerator.unwrap_model(self.model)
        return {
            name: param.detach().to("cpu", copy=True).contiguous()
            for name, param in unwrapped.named_parameters()
            if name in self.trainable_names
        }

    def _save_hook(self, models, weights, output_dir):
        if not weights:  # FSDP / DeepSpeed saved their own (sharded) model states
            return
        weights.clear()
        state = self.trainable_state_dict()
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(state, os.path.join(output_dir, TRAINABLE_WEIGHTS), metadata={"format": "pt"})

    def _load_hook(self, models, input_dir):
        if not models:
            return
        models.clear()
        from safetensors.torch import load_file

        path = Path(input_dir) / TRAINABLE_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the checkpoint is incomplete")
        state = load_file(str(path))
        missing = self.trainable_names - set(state)
        unexpected = set(state) - self.trainable_names
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match this run's trainable parameters (different --train or --lora?): "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        params = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def save(self, step: int, state: TrainState, args: argparse.Namespace) -> Path:
        accelerator = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        temporary = self.output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record = {"global_step": step, "state": state.state_dict(), "args": _jsonable(vars(args))}
            with open(temporary / TRAINER_STATE, "w") as handle:
                json.dump(record, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(temporary)
            if final.exists():
                stale = final.with_name(final.name + ".old")
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(temporary, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(temporary, final)
            _fsync_dir(self.output_dir)
            if args.save_total_limit:
                for _, old in list_checkpoints(self.output_dir)[: -args.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
            logger.info(f"saved checkpoint {final}")
        accelerator.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        self.accelerator.load_state(str(path))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ----- data --------------------------------------------------------------------------------------------------------


def build_dataset(args, tokenizer, config):
    from otter.data import ImageTransform, MimicitDataset, MimicitSource, TaskType, load_mixture_yaml

    if args.mimicit_yaml is not None:
        sources = load_mixture_yaml(args.mimicit_yaml)
    else:
        sources = [
            MimicitSource(
                name=args.instructions.stem,
                task_type=TaskType(args.task_type),
                mimicit_path=args.instructions,
                images_path=args.images,
                train_config_path=args.train_config,
            )
        ]
    return MimicitDataset(
        sources,
        tokenizer,
        ImageTransform(config.vision_config.image_size),
        max_frames=args.max_frames,
        max_length=args.max_length,
        seed=args.seed,
        skip_bad_records=args.skip_bad_records,
        image_index_cache=args.output_dir / "image_index",
    )


# ----- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: torch.nn.Module
    state: TrainState
    history: list[dict]
    output_dir: Path


def make_accelerator(args) -> Accelerator:
    kwargs = {"gradient_accumulation_steps": args.gradient_accumulation_steps, "project_dir": str(args.output_dir)}
    if args.mixed_precision is not None:
        kwargs["mixed_precision"] = args.mixed_precision
    if args.report_to != "none":
        kwargs["log_with"] = args.report_to
    return Accelerator(**kwargs)


def train(args: argparse.Namespace, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run training. `on_step(step, metrics)` is called after every optimizer step (after any checkpoint); an
    exception it raises stops the run there, as a crash would."""
    check_paths(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(args)
    try:
        return _train(args, accelerator, on_step)
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:
            # Let a later train() in the same process build a fresh Accelerator with other settings.
            AcceleratorState._reset_state()
            GradientState._reset_state()


def _train(args, accelerator: Accelerator, on_step) -> TrainResult:
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from otter.data import NON_MODEL_KEYS, MixtureBatchSampler, OtterDataCollator, SpecialTokens

    main_process = accelerator.is_main_process
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    model = load_model(args.model)
    config = model.config
    tokens.check_model_config(config)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab_rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the embeddings only {vocab_rows} rows")
    if args.max_frames is None:
        args.max_frames = getattr(config, "max_num_frames", None)

    groups = args.train or default_train_groups(config)
    mask_rows = (tokens.image, tokens.end_of_chunk, tokens.answer) if args.mask_lm_head else None
    counts = configure_trainable(model, groups, mask_rows)
    if args.lora:
        model = apply_lora(model, args)
    if args.gradient_checkpointing:
        base = model.get_base_model() if args.lora else model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable_names = {name for name, param in model.named_parameters() if param.requires_grad}
    total_params = sum(p.numel() for p in model.parameters())
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        f"training {sorted(groups)}{' + LoRA' if args.lora else ''}: {trainable_params:,} of {total_params:,} "
        f"parameters ({', '.join(f'{g} {n:,}' for g, n in counts.items())})"
    )

    # Data: this process's shard of a deterministic batch order.
    with accelerator.main_process_first():  # the main process scans JSON image files; the others read its offsets
        dataset = build_dataset(args, tokenizer, config)
    if args.validate_data:
        checked = dataset.check_images()
        logger.info(f"checked {checked} images: {dataset.bad_records.summary()}")
    sampler = MixtureBatchSampler(
        dataset.source_ranges,
        args.batch_size,
        bucket_keys=dataset.bucket_keys(),
        seed=args.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    image_size = config.vision_config.image_size
    collator = OtterDataCollator(tokens.pad, padding_side="right", image_shape=(3, image_size, image_size))
    accumulation = args.gradient_accumulation_steps
    if args.max_steps is not None:
        total_steps = args.max_steps
    else:
        micro_batches = sum(len(sampler.epoch_batches(epoch)) for epoch in range(args.epochs))
        total_steps = micro_batches // accumulation
        if micro_batches % accumulation:
            logger.warning(
                f"{micro_batches % accumulation} of {micro_batches} micro-batches per process do not fill a last "
                f"accumulation group of {accumulation} and are not used"
            )
        if total_steps == 0:
            raise ValueError(f"{micro_batches} micro-batches per process make no full optimizer step")
    warmup_steps = args.warmup_steps if args.warmup_ratio is None else round(args.warmup_ratio * total_steps)

    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.adam_beta2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(args.lr_scheduler, warmup_steps, total_steps))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    state.invariants = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": accumulation,
        "num_processes": accelerator.num_processes,
        "max_frames": args.max_frames,
        "max_length": args.max_length,
    }
    invariants = dict(state.invariants)
    accelerator.register_for_checkpointing(scheduler, state)
    checkpointer = Checkpointer(accelerator, model, trainable_names, args.output_dir)

    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if path is None:
            logger.info(f"no checkpoint in {args.output_dir}: starting from scratch")
        else:
            schedule = scheduler.lr_lambdas[0]
            wanted = dict(schedule.__dict__)
            checkpointer.load(path)
            if schedule.__dict__ != wanted:
                logger.warning(f"LR schedule changed since the checkpoint: {schedule.__dict__} -> {wanted}")
                schedule.__dict__.update(wanted)
            changed = {k: (state.invariants.get(k), v) for k, v in invariants.items() if state.invariants.get(k) != v}
            if changed:
                raise ValueError(
                    f"{path} was written with different settings (checkpoint, now): {changed}; the data order "
                    "would not continue where it stopped"
                )
            logger.info(
                f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, batch {state.batch_in_epoch})"
            )

    if args.report_to != "none":
        accelerator.init_trackers("otter-train", config={k: str(v) for k, v in vars(args).items()})
    metrics_path = args.output_dir / METRICS_FILE
    if main_process:  # metrics.jsonl describes this run: a resume replays the steps after its checkpoint
        dropped = truncate_metrics(metrics_path, state.global_step)
        if dropped and state.global_step == 0:
            logger.warning(f"{metrics_path} held {dropped} lines of an earlier run; this run starts it afresh")
        elif dropped:
            logger.info(f"dropped {dropped} lines after step {state.global_step} from {metrics_path}: replayed now")

    from tqdm.auto import tqdm

    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        desc="training",
        disable=args.no_progress_bar or not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    logger.info(
        f"{len(dataset)} samples, {len(sampler.epoch_batches(state.epoch))} batches of {args.batch_size} per process "
        f"per epoch, {accelerator.num_processes} processes, {accumulation} accumulation steps: {total_steps} "
        f"optimizer steps ({warmup_steps} warmup)"
    )
    history = []
    model.train()
    window_loss = torch.zeros((), device=accelerator.device)
    window_micro = 0
    logged_losses: list[float] = []  # per-step losses since the last line of metrics.jsonl
    window_tokens = 0
    window_skipped = 0
    window_start = time.perf_counter()
    grad_norm = None
    done = state.global_step >= total_steps
    while not done:
        dataset.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch, state.batch_in_epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=args.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            generator=torch.Generator().manual_seed(args.seed * 1_000_003 + state.epoch),
        )
        for batch in loader:
            window_skipped += len(batch["skipped_records"])
            for key in NON_MODEL_KEYS:
                batch.pop(key)
            batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
            window_tokens += int(batch["attention_mask"].sum())
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    # All of the model's parameters (frozen ones have no gradient): FSDP needs them to clip the
                    # norm of the whole sharded model, not of this rank's shard.
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            window_loss += loss.detach().float()
            window_micro += 1
            if not accelerator.sync_gradients:
                continue

            state.global_step += 1
            totals = torch.tensor(
                [float(window_loss), window_micro, window_tokens, window_skipped], device=accelerator.device
            )
            totals = accelerator.reduce(totals, reduction="sum")
            elapsed = time.perf_counter() - window_start
            state.tokens_seen += int(totals[2])
            state.skipped_records += int(totals[3])
            metrics = {
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": float(totals[0] / totals[1]),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": float(totals[2]) / max(elapsed, 1e-9),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
            }
            history.append(metrics)
            progress.update(1)
            progress.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}"
            )
            logged_losses.append(metrics["loss"])
            if state.global_step % args.logging_steps == 0 or state.global_step == total_steps:
                # A single step's loss depends on which dataset its batch came from; the mean since the last logged
                # line is what a loss curve should show.
                metrics = {**metrics, "loss_mean": sum(logged_losses) / len(logged_losses)}
                logged_losses.clear()
                if args.report_to != "none":
                    accelerator.log(
                        {k: v for k, v in metrics.items() if v is not None and k != "step"}, step=state.global_step
                    )
                if main_process:
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps(metrics) + "\n")
            window_loss.zero_()
            window_micro = window_tokens = window_skipped = 0
            window_start = time.perf_counter()

            done = state.global_step >= total_steps
            if done or (args.save_steps and state.global_step % args.save_steps == 0):
                checkpointer.save(state.global_step, state, args)
            if on_step is not None:
                on_step(state.global_step, metrics)
            if done:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    if state.skipped_records or dataset.bad_records.total:
        logger.warning(
            f"bad records: {dataset.bad_records.summary()} while building; {state.skipped_records} replaced in batches"
        )
    save_final(accelerator, model, tokenizer, trainable_names, args)
    return TrainResult(accelerator.unwrap_model(model), state, history, args.output_dir)


def save_final(accelerator: Accelerator, model, tokenizer, trainable_names: set[str], args) -> None:
    """`trainable_weights.safetensors` (the trained parameters, by name) always; `hf_model/` (save_pretrained with
    the tokenizer, LoRA merged) with `--save-hf-model`."""
    from safetensors.torch import save_file

    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards (a collective: every rank)
    if accelerator.is_main_process:
        trained = {name: tensor.contiguous() for name, tensor in full_state.items() if name in trainable_names}
        save_file(trained, str(args.output_dir / "trainable_weights.safetensors"), metadata={"format": "pt"})
        logger.info(f"saved {len(trained)} trained tensors to {args.output_dir / 'trainable_weights.safetensors'}")
        if args.save_hf_model:
            unwrapped = accelerator.unwrap_model(model)
            target = args.output_dir / "hf_model"
            if args.lora:
                unwrapped = unwrapped.merge_and_unload()
                full_state = None
            unwrapped.save_pretrained(target, state_dict=full_state, safe_serialization=True)
            tokenizer.save_pretrained(target)
            logger.info(f"saved the full model to {target}")
    accelerator.wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    try:
        train(args)
    except ArgumentError as error:
        if args.debug:
            raise
        print_error(str(error))
        return USAGE_ERROR
    except (OSError, ValueError, ImportError) as error:  # missing files, bad model or data (DataError), options
        if args.debug:
            raise
        print_error(error_line(error), every_rank=True)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
