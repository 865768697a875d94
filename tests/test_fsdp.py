"""FSDP on the CPU. accelerate refuses FSDP without an accelerator, so `otter train` cannot use it here; torch's own
FSDP2 (`fully_shard`) runs over gloo. Two processes shard a tiny Otter into the units of
`configs/accelerate/fsdp.yaml` (every FlamingoLayer, PerceiverBlock and CLIPEncoderLayer). Frozen and trainable
parameters share those units: a FlamingoLayer holds a frozen decoder layer and a trainable cross-attention block.
The sharded loss and gradients must equal an unsharded model's."""

import json
import os
import socket
import subprocess
import sys

from conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fsdp2_sharded_loss_and_gradients_equal_unsharded(tmp_path):
    output = tmp_path / "summary.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO_ROOT / "tests" / "fsdp_worker.py"),
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(output.read_text())
    assert summary["units"] == ["CLIPEncoderLayer", "FlamingoLayer", "PerceiverBlock"]
    assert summary["trained"] > 0 and summary["frozen"] > 0
    assert abs(summary["loss_rank0"] - summary["reference_loss_row0"]) < 1e-5
    assert summary["max_grad_diff"] < 1e-5, summary
