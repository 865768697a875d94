"""Make tests/fixtures/reference/of1_training/: a training `checkpoint.pt` saved the way OpenFlamingo 0.0.2's own
training code saves one, plus the separate tiny LM and vision tower it was trained on.

Runs in the OpenFlamingo 0.0.2 reference venv (see tests/fixtures/reference/README.md), never in the project's
venv, and never imports this project's packages:

    /work/refvenv-of1/bin/python scripts/make_training_checkpoint_fixture_of1.py

The model is the tiny OpenFlamingo v1 of tests/fixtures/reference/of1/: built by `build_model()` of
scripts/make_reference_fixtures_of1.py (0.0.2's own `create_model_and_transforms`, offline), with the weights of
of1/model.safetensors loaded strictly (so the converted checkpoint must give of1/logits.safetensors; the script
checks the rebuilt model reproduces those logits and greedy tokens bit for bit). The factory already froze it as
0.0.2 trains it: everything frozen except the perceiver, `lang_encoder.gated_cross_attn_layers` and the LM input
embeddings. Then, as `open_flamingo/train/train.py` (0.0.2) does, in a one-process CPU "distributed" run:

- `DistributedDataParallel` (gloo, world size 1), so keys carry DDP's `module.` prefix as in real runs;
- AdamW over train.py's `get_grouped_params(ddp_model)` (copied verbatim: it is a closure inside train.py's
  `main()`; note its `if p.requires_grad` is commented out, so the groups hold every parameter), lr 1e-4, weight
  decay 0.1 on the xattn matrices, and train.py's default scheduler, `get_constant_schedule_with_warmup(5000)`;
- the checkpoint dict of train.py's epoch loop, copied verbatim (`epoch`, `model_state_dict` =
  `open_flamingo.train.train_utils.get_checkpoint(ddp_model)`, the package's own function, called here,
  `optimizer_state_dict`, `lr_scheduler_state_dict`), written with `torch.save` to `checkpoint_0.pt` and renamed.
  train.py itself cannot be imported (it imports wandb and webdataset-based data loaders at module level, and its
  code lives in `main()`), hence the copies.

`get_checkpoint` deletes the names of frozen *parameters* only (`named_parameters()`, which lists an aliased tensor
once), so, unlike 2.0.1's `filter_state_dict_to_trainable`, it keeps both names of every cross-attention tensor
(`lang_encoder.model.layers.{i}.gated_cross_attn_layer.*` and the alias `lang_encoder.gated_cross_attn_layers.{i}.*`)
and every buffer (transformers 4.28's persistent LLaMA `rotary_emb.inv_freq`). No training step is taken, so the
weights stay those of the of1 fixture and AdamW's state is empty (its `param_groups` are saved, as in any run).

Written files:

| file | content |
|---|---|
| `checkpoint.pt` | train.py's `checkpoint_0.pt`, renamed |
| `lm/` | the frozen language model as a plain `LlamaForCausalLM` (`save_pretrained`, safetensors, transformers 4.28) with the factory's resized embeddings (101 rows) and its tokenizer (`<|endofchunk|>`, `<image>`, `<PAD>` added) |
| `open_clip_visual.safetensors` | the open_clip vision tower's `state_dict()` (`conv1.weight`, `transformer.resblocks.*`, `proj`, ...) |
| `config.json` | `flamingo_config` of of1/meta.json (`only_attend_previous: false`), for `otter convert --config` |
| `meta.json` | versions, key counts, what the checkpoint holds |
"""

import argparse
import copy
import json
import os
import platform
import socket
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
from open_flamingo.train.train_utils import get_checkpoint
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaForCausalLM, get_constant_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference_fixtures_of1 import SEED, build_model, generate  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"
# train.py's defaults (--learning_rate, --weight_decay, --lr_scheduler constant, --warmup_steps, --num_epochs 1).
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 5000
EPOCH = 0


def get_grouped_params(model, weight_decay=WEIGHT_DECAY):
    """Verbatim from open_flamingo/train/train.py (0.0.2), a closure in its main() (args.weight_decay -> argument)."""
    params_with_wd, params_without_wd = [], []

    def apply_decay(x):
        return (
            "gated_cross_attn_layer" in x
            and "ff_gate" not in x
            and "attn_gate" not in x
            and "norm" not in x
            and "bias" not in x
        )

    for n, p in model.named_parameters():
        # if p.requires_grad:
        if apply_decay(n):
            params_with_wd.append(p)
        else:
            params_without_wd.append(p)

    return [
        {"params": params_with_wd, "weight_decay": weight_decay},
        {"params": params_without_wd, "weight_decay": 0.0},
    ]


def plain_llama(model) -> LlamaForCausalLM:
    """The frozen LM as the HF model it was built from: v1 wraps each decoder layer as `.decoder_layer` of a
    FlamingoLayer; the embeddings and lm_head are the factory's resized ones."""
    source = model.lang_encoder
    config = copy.deepcopy(source.config)
    config._name_or_path = "of1-tiny-llama"  # not the temporary build dir: keeps the output byte-reproducible
    lm = LlamaForCausalLM(config)
    state_dict = {
        "model.embed_tokens.weight": source.model.embed_tokens.weight,
        "model.norm.weight": source.model.norm.weight,
        "lm_head.weight": source.lm_head.weight,
    }
    for i, layer in enumerate(source.model.layers):
        state_dict.update({f"model.layers.{i}.{k}": v for k, v in layer.decoder_layer.state_dict().items()})
    lm.load_state_dict(state_dict, strict=True)
    return lm.eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REFERENCE / "of1_training")
    args = parser.parse_args(argv)
    output = args.output.resolve()

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer = build_model(Path(workdir))
    model.load_state_dict(load_file(str(REFERENCE / "of1" / "model.safetensors")), strict=True)
    inputs = load_file(str(REFERENCE / "of1" / "inputs.safetensors"))
    expected = load_file(str(REFERENCE / "of1" / "logits.safetensors"))
    with torch.no_grad():
        logits = model(**inputs).logits
    attended = inputs["attention_mask"].bool()
    if not torch.equal(logits[attended], expected["logits"][attended]):
        raise SystemExit("the rebuilt model does not reproduce tests/fixtures/reference/of1/logits.safetensors")
    if not torch.equal(generate(model, inputs, use_cache=True), expected["generated"]):
        raise SystemExit("the rebuilt model does not reproduce the generated tokens of of1/logits.safetensors")
    # The factory's trainable set (named_parameters() names an aliased xattn tensor by its first path, in the layer).
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable or not all(
        name.startswith(("perceiver.", "lang_encoder.model.embed_tokens."))
        or (name.startswith("lang_encoder.model.layers.") and ".gated_cross_attn_layer." in name)
        for name in trainable
    ):
        raise SystemExit(f"unexpected trainable set from the factory: {sorted(trainable)[:5]}")

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp_model = DDP(model)
        optimizer = torch.optim.AdamW(get_grouped_params(ddp_model), lr=LEARNING_RATE)
        lr_scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=WARMUP_STEPS)
        output.mkdir(parents=True, exist_ok=True)
        # train.py (0.0.2), end of each epoch on rank 0:
        checkpoint_dict = {
            "epoch": EPOCH,
            "model_state_dict": get_checkpoint(ddp_model),
            "optimizer_state_dict": optimizer.state_dict(),
            "lr_scheduler_state_dict": lr_scheduler.state_dict(),
        }
        torch.save(checkpoint_dict, f"{output}/checkpoint_{EPOCH}.pt")
    finally:
        dist.destroy_process_group()
    os.replace(output / f"checkpoint_{EPOCH}.pt", output / "checkpoint.pt")

    lm = plain_llama(model)
    lm.save_pretrained(str(output / "lm"), safe_serialization=True)
    tokenizer.save_pretrained(str(output / "lm"))
    save_file(
        {k: v.detach().contiguous().clone() for k, v in model.vision_encoder.visual.state_dict().items()},
        str(output / "open_clip_visual.safetensors"),
    )
    flamingo_config = json.loads((REFERENCE / "of1" / "meta.json").read_text())["flamingo_config"]
    assert flamingo_config["only_attend_previous"] is False
    (output / "config.json").write_text(json.dumps(flamingo_config, indent=2) + "\n")

    checkpoint = torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=True)
    keys = sorted(checkpoint["model_state_dict"])
    aliases = [k for k in keys if k.startswith("module.lang_encoder.gated_cross_attn_layers.")]
    meta = {
        "generator": "scripts/make_training_checkpoint_fixture_of1.py",
        "versions": {
            "python": platform.python_version(),
            "open_flamingo": version("open-flamingo"),
            "open_clip_torch": version("open_clip_torch"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "safetensors": version("safetensors"),
        },
        "saved_by": (
            "open_flamingo 0.0.2 train.py's checkpoint dict with open_flamingo.train.train_utils.get_checkpoint "
            f"(DDP, gloo, world size 1, epoch {EPOCH}), torch.save"
        ),
        "weights": "tests/fixtures/reference/of1/model.safetensors (compare with of1/logits.safetensors)",
        "checkpoint_top_level_keys": sorted(checkpoint),
        "model_state_dict_keys": len(keys),
        "model_state_dict_prefixes": sorted({".".join(k.split(".")[:3]) for k in keys}),
        "alias_keys": len(aliases),
        "inv_freq_buffers": sum(k.endswith("rotary_emb.inv_freq") for k in keys),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer": {
            "class": "AdamW",
            "lr": LEARNING_RATE,
            "weight_decay_xattn": WEIGHT_DECAY,
            "params_per_group": [len(g["params"]) for g in checkpoint["optimizer_state_dict"]["param_groups"]],
            "state_entries": len(checkpoint["optimizer_state_dict"]["state"]),
        },
        "lr_scheduler": f"get_constant_schedule_with_warmup(num_warmup_steps={WARMUP_STEPS})",
        "lm": {"vocab_size": lm.config.vocab_size, "tokenizer_len": len(tokenizer)},
    }
    (output / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    print(f"wrote {len(keys)} checkpoint tensors ({len(aliases)} aliases), {total / 1e6:.2f} MB to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
