"""otter.train on the tiny Otter and a small shapes dataset (CPU): learning, resume, what trains, checkpoints."""

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO_ROOT, TINY_TOKENIZER, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from otter.data import DataError, ImageTransform, MimicitDataset, OtterDataCollator, load_mixture_yaml
from otter.data.shapes import make_shapes_dataset
from otter.train import (
    TRAIN_GROUPS,
    Schedule,
    build_optimizer,
    configure_trainable,
    main,
    parameter_groups,
    parse_args,
    resolve_checkpoint,
    train,
    truncate_metrics,
)

STEPS = 30


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=0, num_image=12, num_in_context=6, num_videos=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-otter")
    tiny_model("otter", seed=0, gates=None).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(path)
    return path


def argv(model_dir, shapes, output_dir, *extra):
    return [
        "--model",
        str(model_dir),
        "--mimicit-yaml",
        str(shapes.train_yaml),
        "--output-dir",
        str(output_dir),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--seed",
        "0",
        "--no-progress-bar",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(model_dir, shapes, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    args = parse_args(
        argv(model_dir, shapes, output_dir, "--max-steps", str(STEPS), "--lr", "2e-3", "--save-steps", "10")
    )
    return train(args)


def losses(history):
    return [entry["loss"] for entry in history]


def test_loss_decreases(trained):
    loss = losses(trained.history)
    assert len(loss) == STEPS and trained.state.global_step == STEPS
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < first - 0.5, loss
    logged = [json.loads(line) for line in (trained.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, STEPS + 1))
    assert all(entry["tokens_per_s"] > 0 and entry["lr"] == pytest.approx(2e-3) for entry in logged)
    assert all(entry["loss_mean"] == entry["loss"] for entry in logged)  # one step per line


def test_logged_lines_carry_the_mean_loss_since_the_last_line(model_dir, shapes, tmp_path):
    result = train(parse_args(argv(model_dir, shapes, tmp_path, "--max-steps", "5", "--logging-steps", "3")))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_step = losses(result.history)
    assert [entry["step"] for entry in logged] == [3, 5]
    assert logged[0]["loss_mean"] == pytest.approx(sum(per_step[:3]) / 3)
    assert logged[1]["loss_mean"] == pytest.approx(sum(per_step[3:]) / 2)
    assert logged[1]["loss"] == per_step[4]


def test_frozen_parameters_unchanged_and_trained_ones_saved(trained, model_dir):
    initial = dict(AutoModelForImageTextToText.from_pretrained(model_dir).named_parameters())
    final = dict(trained.model.named_parameters())
    groups = parameter_groups(trained.model)
    trainable = {name for group in ("xattn", "perceiver", "embeddings", "lm_head") for name in groups[group]}
    assert {name for name, param in final.items() if param.requires_grad} == trainable  # Otter's defaults
    for name, param in final.items():
        if name in trainable:
            assert not torch.equal(param, initial[name]), f"{name} did not train"
        else:
            assert torch.equal(param, initial[name]), f"frozen {name} changed"
    saved = load_file(trained.output_dir / "trainable_weights.safetensors")
    assert set(saved) == trainable
    assert all(torch.equal(saved[name], final[name]) for name in saved)


def test_checkpoints_are_complete_and_atomic(trained):
    names = sorted(p.name for p in trained.output_dir.iterdir())
    assert names == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
        "image_index",  # byte offsets of the JSON images file, shared by processes and runs
        "metrics.jsonl",
        "trainable_weights.safetensors",
    ]
    checkpoint = trained.output_dir / "checkpoint-20"
    assert {p.name for p in checkpoint.iterdir()} == {
        "trainable.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "custom_checkpoint_0.pkl",  # LR scheduler
        "custom_checkpoint_1.pkl",  # step, epoch and batch position
        "trainer_state.json",
    }
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 20 and state["state"]["batch_in_epoch"] >= 0
    # A half-written checkpoint is never "latest".
    (trained.output_dir / "checkpoint-99.tmp").mkdir()
    try:
        assert resolve_checkpoint("latest", trained.output_dir) == trained.output_dir / "checkpoint-30"
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            resolve_checkpoint(str(trained.output_dir / "checkpoint-99.tmp"), trained.output_dir)
    finally:
        (trained.output_dir / "checkpoint-99.tmp").rmdir()


def test_gradient_checkpointing_gives_the_same_losses(trained, model_dir, shapes, tmp_path):
    args = parse_args(
        argv(
            model_dir,
            shapes,
            tmp_path,
            "--max-steps",
            "3",
            "--lr",
            "2e-3",
            "--save-steps",
            "10",
            "--gradient-checkpointing",
        )
    )
    result = train(args)
    assert losses(result.history) == pytest.approx(losses(trained.history)[:3], abs=1e-5)


class Killed(Exception):
    pass


def test_resume_continues_the_same_loss_curve(model_dir, shapes, tmp_path):
    schedule = ["--max-steps", "8", "--save-steps", "4", "--gradient-accumulation-steps", "2", "--lr", "1e-3"]
    schedule += ["--lr-scheduler", "cosine", "--warmup-steps", "2"]
    uninterrupted = train(parse_args(argv(model_dir, shapes, tmp_path / "a", *schedule)))

    def crash_at_step_6(step, metrics):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(parse_args(argv(model_dir, shapes, tmp_path / "b", *schedule)), on_step=crash_at_step_6)
    assert resolve_checkpoint("latest", tmp_path / "b").name == "checkpoint-4"
    resumed = train(
        parse_args(argv(model_dir, shapes, tmp_path / "b", *schedule, "--resume-from-checkpoint", "latest"))
    )
    assert [entry["step"] for entry in resumed.history] == [5, 6, 7, 8]
    # The crashed run had logged steps 5 and 6 after checkpoint-4; the resumed run replaced them, not appended.
    assert logged_steps(tmp_path / "b") == list(range(1, 9))
    expected = {entry["step"]: entry for entry in uninterrupted.history}
    for entry in resumed.history:
        assert abs(entry["loss"] - expected[entry["step"]]["loss"]) < 1e-5
        assert entry["lr"] == pytest.approx(expected[entry["step"]]["lr"])
    final_a = dict(uninterrupted.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.allclose(param, final_a[name], atol=1e-6), name

    # The data position only means something with the same batch size, seed, etc.
    with pytest.raises(ValueError, match="batch_size"):
        changed = argv(model_dir, shapes, tmp_path / "b", *schedule, "--resume-from-checkpoint", "latest")
        train(parse_args([*changed, "--batch-size", "2"]))


def logged_steps(output_dir):
    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_run_resumes_with_the_same_losses_and_each_step_logged_once(model_dir, shapes, tmp_path):
    """A real `kill -9` (SIGKILL) of `python -m otter.train` once its first checkpoint is complete, then
    `--resume-from-checkpoint latest`. The killed run may have logged steps past its checkpoint (and a line cut
    short), which the resumed run replays: metrics.jsonl must end up with every step once, in order."""
    run = argv(model_dir, shapes, tmp_path / "killed", "--max-steps", "1000", "--save-steps", "3", "--lr", "1e-3")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "otter.train", *run],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "killed" / "checkpoint-3").is_dir():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-3 after 180 s"
            time.sleep(0.02)
        process.kill()  # SIGKILL: no cleanup, no exception handler, no final save
        assert process.wait(timeout=60) == -9
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    checkpoint = resolve_checkpoint("latest", tmp_path / "killed")
    resumed_at = int(checkpoint.name.removeprefix("checkpoint-"))
    assert resumed_at >= 3 and not (tmp_path / "killed" / "trainable_weights.safetensors").exists()
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as handle:  # what a run killed later would have logged
        for step in range(resumed_at + 1, resumed_at + 6):
            handle.write(json.dumps({"step": step, "loss": 99.0}) + "\n")
        handle.write('{"step": ')

    stop = resumed_at + 3

    def stop_at(step, metrics):
        if step == stop:
            raise Killed

    with pytest.raises(Killed):
        train(parse_args([*run, "--resume-from-checkpoint", "latest"]), on_step=stop_at)
    logged = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, stop + 1))
    reference = []
    with pytest.raises(Killed):
        train(
            parse_args(argv(model_dir, shapes, tmp_path / "reference", *run[run.index("--max-steps") :])),
            on_step=lambda step, metrics: (reference.append(metrics["loss"]), stop_at(step, metrics)),
        )
    assert [entry["loss"] for entry in logged] == pytest.approx(reference, abs=1e-5)


def test_a_new_run_in_an_old_output_dir_starts_metrics_afresh(model_dir, shapes, tmp_path, caplog):
    run = argv(model_dir, shapes, tmp_path, "--max-steps", "3")
    train(parse_args(run))
    with caplog.at_level(logging.WARNING, logger="otter.train"):
        train(parse_args(run))
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # not the first run's three lines followed by the second's
    assert any("held 3 lines of an earlier run" in message for message in caplog.messages)


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0}) for step in (2, 4, 6, 8)]
    path.write_text("\n".join(lines) + '\n{"step": 1')
    assert truncate_metrics(path, 4) == 3
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert truncate_metrics(path, 4) == 0 and truncate_metrics(tmp_path / "missing.jsonl", 4) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_epochs_warmup_ratio_and_tensorboard(model_dir, shapes, tmp_path):
    """12 samples in batches of 5 make ceil(12 / 5) = 3 micro-batches an epoch; 4 epochs with 2 accumulation steps
    make 6 optimizer steps, 3 of them warmup (--warmup-ratio 0.5). TensorBoard gets the same loss and LR."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = [
        *["--model", str(model_dir), "--output-dir", str(tmp_path), "--num-workers", "0", "--no-progress-bar"],
        *["--instructions", str(shapes.output_dir / "SHAPES_IMAGE_instructions.json"), "--images", str(shapes.images)],
        *["--train-config", str(shapes.output_dir / "SHAPES_IMAGE_train.json")],
        *["--batch-size", "5", "--epochs", "4", "--gradient-accumulation-steps", "2"],
        *["--lr", "1e-3", "--lr-scheduler", "linear", "--warmup-ratio", "0.5", "--report-to", "tensorboard"],
    ]
    result = train(parse_args(run))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6] and result.state.global_step == 6
    # Steps cross epochs: step 2 is epoch 0's last micro-batch and epoch 1's first; `epoch` is the latter's.
    assert [entry["epoch"] for entry in logged] == [0, 1, 1, 2, 3, 3]
    # The LR after step s (what step s + 1 uses): warmup (s + 1) / 4 for s < 3, then linear decay to 0 at step 6.
    assert [entry["lr"] for entry in logged] == pytest.approx([1e-3 * f for f in (2 / 4, 3 / 4, 1, 2 / 3, 1 / 3, 0)])

    events = list(tmp_path.glob("otter-train/events.out.tfevents.*"))
    assert events, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert {"loss", "lr", "loss_mean", "tokens_per_s"} <= set(accumulator.Tags()["scalars"])
    scalars = {tag: accumulator.Scalars(tag) for tag in ("loss", "lr")}
    assert [event.step for event in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [event.value for event in scalars["loss"]] == pytest.approx([e["loss"] for e in logged], rel=1e-6)
    assert [event.value for event in scalars["lr"]] == pytest.approx([e["lr"] for e in logged], rel=1e-6, abs=1e-12)


def test_bf16_mixed_precision_and_save_total_limit(trained, model_dir, shapes, tmp_path):
    args = ["--max-steps", "4", "--lr", "2e-3", "--save-steps", "1", "--save-total-limit", "2"]
    result = train(parse_args(argv(model_dir, shapes, tmp_path, *args, "--mixed-precision", "bf16")))
    bf16, fp32 = losses(result.history), losses(trained.history)[:4]
    assert all(torch.isfinite(torch.tensor(bf16))) and bf16 != fp32  # it did run in bf16 (CPU autocast)
    assert bf16 == pytest.approx(fp32, rel=5e-3)  # bf16 keeps 8 bits of mantissa; observed ~1e-4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


@pytest.fixture
def bad_image_run(model_dir, shapes, tmp_path):
    """The image task of the shapes data with one undecodable image (record SHAPES_IMAGE_train_00000's)."""
    images = json.loads(shapes.images.read_text())
    images["SHAPES_IMG_000000"] = base64.urlsafe_b64encode(b"not an image at all").decode()
    bad_images = tmp_path / "bad_images.json"
    bad_images.write_text(json.dumps(images))
    output_dir = tmp_path / "run"
    return output_dir, [
        *["--model", str(model_dir), "--output-dir", str(output_dir), "--images", str(bad_images)],
        *["--instructions", str(shapes.output_dir / "SHAPES_IMAGE_instructions.json")],
        *["--train-config", str(shapes.output_dir / "SHAPES_IMAGE_train.json")],
        *["--batch-size", "4", "--num-workers", "0", "--no-progress-bar", "--max-steps", "3", "--save-steps", "3"],
    ]


def failure_message(run, capsys) -> str:
    """The CLI's error for a failed run: the exception main() lets through, or what it printed before exiting."""
    try:
        code = main(run)
    except SystemExit as error:
        code = error.code
    except DataError as error:
        return str(error)
    assert code not in (0, None), "the run succeeded"
    return capsys.readouterr().err


def test_bad_records_fail_the_run_or_are_skipped_and_counted(bad_image_run, capsys, caplog):
    output_dir, run = bad_image_run
    # Without --skip-bad-records a bad record stops the run, naming it (when a batch loads it, or up front).
    failing = [*run, "--output-dir", str(output_dir.with_name("failing"))]
    assert "SHAPES_IMAGE_train_00000" in failure_message(failing, capsys)
    message = failure_message([*failing, "--validate-data"], capsys)
    assert "SHAPES_IMG_000000" in message and "bad_images.json" in message

    # --skip-bad-records: the batch that holds it gets the next sample instead; counted in the checkpoint and logged.
    with caplog.at_level(logging.INFO):
        assert main([*run, "--skip-bad-records"]) == 0
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())["state"]
    assert state["skipped_records"] == 1
    assert "skipping bad record" in caplog.text and "SHAPES_IMG_000000" in caplog.text
    assert "1 replaced in batches" in caplog.text
    assert logged_steps(output_dir) == [1, 2, 3]

    # --validate-data --skip-bad-records: found before training, its sample removed, the run goes on.
    caplog.clear()
    shutil.rmtree(output_dir)
    with caplog.at_level(logging.INFO):
        assert main([*run, "--skip-bad-records", "--validate-data"]) == 0
    assert "checked 12 images: 1 bad records skipped" in caplog.text
    assert "removing sample 'SHAPES_IMAGE_train_00000'" in caplog.text
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())["state"]
    assert state["skipped_records"] == 0 and logged_steps(output_dir) == [1, 2, 3]


def test_report_to_wandb_without_wandb_names_what_to_install(monkeypatch, capsys):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--output-dir", "o", "--mimicit-yaml", "y", "--report-to", "wandb"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--report-to wandb needs wandb, which the train extra leaves out: pip install wandb" in error


def batch_of(shapes, tokenizer, size=6):
    dataset = MimicitDataset(load_mixture_yaml(shapes.train_yaml), tokenizer, ImageTransform(32))
    picks = [0, 1, dataset.source_ranges[1][0], dataset.source_ranges[1][0] + 1, dataset.source_ranges[3][0]][:size]
    batch = OtterDataCollator(tokenizer.pad_token_id, image_shape=(3, 32, 32))([dataset[i] for i in picks])
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "vision_x")}


@pytest.mark.parametrize(
    "groups", [["xattn"], ["perceiver", "lm_head"], ["embeddings"], ["lm", "vision"], list(TRAIN_GROUPS)]
)
def test_only_the_selected_groups_get_gradients(shapes, groups):
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    model = tiny_model("otter", gates=1.0).train()
    counts = configure_trainable(model, groups)
    assert set(counts) == set(groups) and all(count > 0 for count in counts.values())
    model(**batch_of(shapes, tokenizer)).loss.backward()
    by_group = parameter_groups(model)
    selected = {name for group in groups for name in by_group[group]}
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in selected), name
    for group in groups:
        assert any(model.get_parameter(name).grad.abs().sum() > 0 for name in by_group[group]), group


def test_mask_lm_head_updates_only_the_special_rows(shapes):
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    model = tiny_model("otter", gates=1.0).train()
    special = (4, 3, 5)  # <image>, <|endofchunk|>, <answer>
    configure_trainable(model, ["xattn", "embeddings", "lm_head"], mask_rows=special)
    model(**batch_of(shapes, tokenizer)).loss.backward()
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        others = [row for row in range(weight.shape[0]) if row not in special]
        assert not weight.grad[others].any()
        assert weight.grad[list(special)].abs().sum() > 0


def test_weight_decay_only_on_cross_attention_weights():
    model = tiny_model("otter", gates=None)
    configure_trainable(model, list(TRAIN_GROUPS))
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    names = {id(param): name for name, param in model.named_parameters()}
    decayed = sorted(names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert decayed and all("gated_cross_attn_layer" in name and name.endswith(".weight") for name in decayed)
    assert not any("gate" in name.rsplit(".", 2)[-2] or "norm" in name for name in decayed)
    assert any(name.endswith("attn.to_q.weight") for name in decayed)
    everything = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert len(everything) == sum(1 for p in model.parameters() if p.requires_grad)


def test_schedules():
    linear, cosine, constant = Schedule("linear", 2, 10), Schedule("cosine", 2, 10), Schedule("constant", 2, 10)
    assert [round(linear(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    assert cosine(2) == 1.0 and cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert constant(1) == pytest.approx(2 / 3) and constant(50) == 1.0


def test_fsdp_config_wraps_existing_layer_classes():
    config = yaml.safe_load((REPO_ROOT / "configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    assert config["fsdp_use_orig_params"] is True
    wrapped = config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert set(wrapped) == {"FlamingoLayer", "PerceiverBlock", "CLIPEncoderLayer"}
    present = {type(module).__name__ for module in tiny_model("otter", gates=None).modules()}
    assert set(wrapped) <= present
    for name in ("single", "ddp", "deepspeed_zero2", "deepspeed_zero3"):
        assert yaml.safe_load((REPO_ROOT / f"configs/accelerate/{name}.yaml").read_text())["distributed_type"]


def test_main_with_explicit_files_lora_and_hf_export(model_dir, shapes, tmp_path):
    """`main(argv)` with --instructions/--images/--train-config (in-context task), LoRA, and --save-hf-model."""
    out = tmp_path / "run"
    code = main(
        [
            "--model",
            str(model_dir),
            "--instructions",
            str(shapes.output_dir / "SHAPES_ICL_instructions.json"),
            "--images",
            str(shapes.images),
            "--train-config",
            str(shapes.output_dir / "SHAPES_ICL_train.json"),
            "--task-type",
            "in_context",
            "--output-dir",
            str(out),
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--num-workers",
            "0",
            "--lora",
            "--lora-rank",
            "4",
            "--save-hf-model",
            "--no-progress-bar",
        ]
    )
    assert code == 0
    exported = AutoModelForImageTextToText.from_pretrained(out / "hf_model")
    assert not any("lora" in name for name, _ in exported.named_parameters())
    assert AutoTokenizer.from_pretrained(out / "hf_model").convert_tokens_to_ids("<answer>") == 5
    saved = load_file(out / "trainable_weights.safetensors")
    assert any("lora_A" in name for name in saved) and any("gated_cross_attn_layer" in name for name in saved)


def test_argument_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--output-dir", "o"])
    assert "give --mimicit-yaml or --instructions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--output-dir", "o", "--instructions", "i.json"])
    assert "--task-type image needs --images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--output-dir", "o", "--mimicit-yaml", "y", "--train", "lm", "--lora"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_ddp_run_completes_and_saves(model_dir, shapes, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2` on the CPU, as the config's own
    comment says (gloo; ACCELERATE_USE_CPU makes it CPU DDP, while `--cpu` would start a single process)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "otter.train",
        *argv(model_dir, shapes, tmp_path, "--max-steps", "3", "--save-steps", "2"),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint-2", "checkpoint-3", "trainable_weights.safetensors"}
    assert (tmp_path / "checkpoint-3" / "random_states_1.pkl").is_file()
    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3]  # logged once, by the main process
