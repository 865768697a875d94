"""Make tests/fixtures/reference/of2_training/: a training `checkpoint.pt` written by OpenFlamingo 2.0.1's own
training code, plus the separate tiny LM and vision tower it was trained on.

Runs in the OpenFlamingo 2.0.1 reference venv (see tests/fixtures/reference/README.md), never in the project's
venv, and never imports this project's packages:

    /work/refvenv-of2/bin/python scripts/make_training_checkpoint_fixture.py

The model is the tiny OpenFlamingo of tests/fixtures/reference/of2/: built by `build_model()` of
scripts/make_reference_fixtures.py, with the weights of of2/model.safetensors (so the converted checkpoint must give
of2/logits.safetensors). The checkpoint is then saved the way `open_flamingo/train/train.py` does, with its own
functions, in a one-process CPU "distributed" run:

- freezing as `open_flamingo.src.factory.create_model_and_transforms` does (everything frozen, then the perceiver,
  `lang_encoder.gated_cross_attn_layers` and the input embeddings trainable). `build_model()` goes through the
  factory, which already froze the model; its seven freezing lines are applied again after the weights are loaded,
  so the trainable set does not depend on how the model was built;
- `DistributedDataParallel` (gloo, world size 1), so keys carry DDP's `module.` prefix as in real runs;
- AdamW over the trainable parameters with train.py's weight-decay groups, and transformers'
  `get_constant_schedule_with_warmup`;
- `open_flamingo.train.train_utils.save_checkpoint` (which calls `filter_state_dict_to_trainable`): the file holds
  `epoch`, `model_state_dict` (trainable parameters and every `embed` parameter; the aliases and the vision
  encoder removed), `optimizer_state_dict` and `lr_scheduler_state_dict`. No training step is taken, so the
  weights stay those of the of2 fixture. train_utils imports wandb at module level; wandb is not installed in the
  reference venv and is never called (report_to_wandb=False), so an empty stand-in module is put in sys.modules.

Written files:

| file | content |
|---|---|
| `checkpoint.pt` | `save_checkpoint(...)`'s `checkpoint_0.pt`, renamed |
| `lm/` | the frozen language model as a plain `LlamaForCausalLM` (`save_pretrained`, safetensors) |
| `open_clip_visual.safetensors` | the open_clip vision tower's `state_dict()` (`conv1.weight`, `transformer.resblocks.*`, `proj`, ...) |
| `config.json` | our FlamingoConfig fields for the model (from `describe()`), for `otter convert --config` |
| `meta.json` | versions, key counts, what the checkpoint holds |
"""

import argparse
import json
import os
import platform
import socket
import sys
import types
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaConfig, LlamaForCausalLM, get_constant_schedule_with_warmup

sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # imported by train_utils, never called here
from open_flamingo.train.train_utils import save_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference_fixtures import TEXT, build_model  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 10


def freeze_as_the_factory_does(model):
    """open_flamingo/src/factory.py, create_model_and_transforms (freeze_lm_embeddings=False)."""
    model.requires_grad_(False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)


def optimizer_as_train_py_does(ddp_model):
    """open_flamingo/train/train.py: AdamW over the trainable parameters, weight decay on the xattn layers only."""
    params_to_optimize = [
        (n, p)
        for n, p in ddp_model.named_parameters()
        if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)
    ]
    with_wd = [p for n, p in params_to_optimize if "gated_cross_attn" in n]
    without_wd = [p for n, p in params_to_optimize if "gated_cross_attn" not in n]
    return torch.optim.AdamW(
        [{"params": with_wd, "weight_decay": WEIGHT_DECAY}, {"params": without_wd, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
    )


def plain_llama(model) -> LlamaForCausalLM:
    """The frozen LM as the HF model it was built from (the `old_decoder_blocks` are the unwrapped layers)."""
    lm = LlamaForCausalLM(LlamaConfig(**TEXT))
    source = model.lang_encoder
    state_dict = {
        "model.embed_tokens.weight": source.model.embed_tokens.weight,
        "model.norm.weight": source.model.norm.weight,
        "lm_head.weight": source.lm_head.weight,
    }
    for i, block in enumerate(source.old_decoder_blocks):
        state_dict.update({f"model.layers.{i}.{k}": v for k, v in block.state_dict().items()})
    missing, unexpected = lm.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith("rotary_emb.inv_freq") for k in missing), (missing, unexpected)
    return lm.eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REFERENCE / "of2_training")
    args = parser.parse_args(argv)
    output = args.output.resolve()

    model = build_model()
    weights = load_file(str(REFERENCE / "of2" / "model.safetensors"))
    model.load_state_dict(weights, strict=True)
    inputs = load_file(str(REFERENCE / "of2" / "inputs.safetensors"))
    expected = load_file(str(REFERENCE / "of2" / "logits.safetensors"))["logits"]
    with torch.no_grad():
        logits = model(**inputs).logits
    attended = inputs["attention_mask"].bool()
    if not torch.equal(logits[attended], expected[attended]):
        raise SystemExit("the rebuilt model does not reproduce tests/fixtures/reference/of2/logits.safetensors")

    freeze_as_the_factory_does(model)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp_model = DDP(model)
        optimizer = optimizer_as_train_py_does(ddp_model)
        lr_scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=WARMUP_STEPS)
        output.mkdir(parents=True, exist_ok=True)
        run_args = types.SimpleNamespace(
            fsdp=False,
            fsdp_use_orig_params=False,
            rank=0,
            run_name=str(output),
            report_to_wandb=False,
            save_checkpoints_to_wandb=False,
            delete_previous_checkpoint=False,
        )
        save_checkpoint(ddp_model, optimizer, lr_scheduler, 0, run_args)
    finally:
        dist.destroy_process_group()
    os.replace(output / "checkpoint_0.pt", output / "checkpoint.pt")

    plain_llama(model).save_pretrained(output / "lm", safe_serialization=True)
    visual = model.vision_encoder.visual if hasattr(model.vision_encoder, "visual") else model.vision_encoder
    save_file(
        {k: v.detach().contiguous().clone() for k, v in visual.state_dict().items()},
        str(output / "open_clip_visual.safetensors"),
    )
    flamingo_config = json.loads((REFERENCE / "of2" / "meta.json").read_text())["flamingo_config"]
    (output / "config.json").write_text(json.dumps(flamingo_config, indent=2) + "\n")

    checkpoint = torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=False)
    keys = sorted(checkpoint["model_state_dict"])
    meta = {
        "generator": "scripts/make_training_checkpoint_fixture.py",
        "versions": {
            "python": platform.python_version(),
            "open_flamingo": version("open-flamingo"),
            "open_clip_torch": version("open_clip_torch"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "safetensors": version("safetensors"),
        },
        "saved_by": "open_flamingo.train.train_utils.save_checkpoint (DDP, gloo, world size 1, epoch 0)",
        "weights": "tests/fixtures/reference/of2/model.safetensors (compare with of2/logits.safetensors)",
        "checkpoint_top_level_keys": sorted(checkpoint),
        "model_state_dict_keys": len(keys),
        "model_state_dict_prefixes": sorted({".".join(k.split(".")[:3]) for k in keys}),
        "optimizer": {"class": "AdamW", "lr": LEARNING_RATE, "weight_decay_xattn": WEIGHT_DECAY},
        "lr_scheduler": f"get_constant_schedule_with_warmup(num_warmup_steps={WARMUP_STEPS})",
    }
    (output / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    print(f"wrote {len(keys)} checkpoint tensors, {total / 1e6:.2f} MB to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
