"""One process of `test_fsdp.py`: shards a tiny Otter with torch's FSDP2 (`fully_shard`) on the CPU over gloo, with
the units that `configs/accelerate/fsdp.yaml` names, and compares its loss and gradients with an unsharded copy.
Rank 0 writes the figures as JSON to the path given as the only argument."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from conftest import REPO_ROOT, left_pad, prompt, random_images, tiny_model
from torch.distributed.fsdp import fully_shard

from flamingo import modeling_flamingo


def unit_classes() -> tuple[type, ...]:
    """The classes the accelerate FSDP config wraps, resolved in this process's modules."""
    from transformers.models.clip import modeling_clip

    config = yaml.safe_load((REPO_ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    names = config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    return tuple(getattr(modeling_flamingo, name, None) or getattr(modeling_clip, name) for name in names)


def main(output: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    # Each rank its own rows: the sharded gradients are the mean over ranks, the reference sees all rows.
    rows = [prompt("img", 6, "eoc", "img", 4, seed=0), prompt("img", 3, "eoc", "img", 7, seed=1)]
    ids, mask = left_pad(rows)
    images = random_images(2, 2, seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    rank = dist.get_rank()

    def loss_of(model, rows):
        return model(input_ids=ids[rows], attention_mask=mask[rows], vision_x=images[rows], labels=labels[rows]).loss

    reference = tiny_model("otter", seed=2).train()
    reference_losses = [loss_of(reference, slice(i, i + 1)) for i in range(2)]
    (sum(reference_losses) / 2).backward()

    model = tiny_model("otter", seed=2).train()
    units = [module for module in model.modules() if isinstance(module, unit_classes())]
    unit_names = sorted({type(module).__name__ for module in units})  # before fully_shard renames the classes
    for module in units:
        fully_shard(module)
    fully_shard(model)
    loss = loss_of(model, slice(rank, rank + 1))
    loss.backward()

    worst, trained, frozen = 0.0, 0, 0
    for (name, sharded), (_, plain) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if plain.grad is None:
            assert sharded.grad is None, f"{name}: frozen in the reference, but got a gradient when sharded"
            frozen += 1
            continue
        worst = max(worst, (sharded.grad.full_tensor() - plain.grad).abs().max().item())
        trained += 1
    if rank == 0:
        summary = {
            "units": unit_names,
            "num_units": len(units),
            "loss_rank0": loss.item(),
            "reference_loss_row0": reference_losses[0].item(),
            "max_grad_diff": worst,
            "trained": trained,
            "frozen": frozen,
        }
        output.write_text(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
