"""Rebuild the embedded default model `otter-tiny-shapes` (`otter/default_model/`) end to end, reproducibly:

1. a BPE tokenizer trained on the shapes vocabulary (special-token ids as in `configs/otter-tiny-shapes.json`);
2. the synthetic shapes dataset in MIMIC-IT format (`otter.data.shapes`, train split, seed 0);
3. training from scratch with the project's own loop (`python -m otter.train`, every parameter group, 1 thread);
4. the model (safetensors), processor, tokenizer and generation config, saved with `save_pretrained`;
5. a held-out evaluation (`otter.evaluate`, shapes questions drawn with another seed) written into the model card;
6. the new directory replaces the old one only when it is complete (written beside it, then renamed).

    python scripts/build_default_model.py [--output otter/default_model] [--work-dir runs/default] [--min-accuracy 0.9]

Same seed, same thread count, same torch: same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread, set before torch starts its pools: reproducible results, and on a busy machine far faster for a model
# this small than several threads spinning against each other.
_threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
os.environ.setdefault("OMP_NUM_THREADS", _threads or "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

MODEL_NAME = "otter-tiny-shapes"
CONFIG_PATH = REPO_ROOT / "configs" / f"{MODEL_NAME}.json"
DEFAULT_OUTPUT = REPO_ROOT / "otter" / "default_model"
SPECIAL_TOKENS = ["<PAD>", "<s>", "</s>", "<|endofchunk|>", "<image>", "<answer>", "<unk>"]
TOKENIZER_VOCAB = 256

# The recipe. Changing any of these changes the model (the card records them).
DATA = {"seed": 0, "image_size": 64, "num_image": 18000, "num_in_context": 600, "num_videos": 3000, "frames": 4}
# Samples per epoch of each single-image question type (6000 of each are drawn), of the in-context samples (600,
# three questions each) and of the 8 text-only facts, and all 6000 video samples (3000 videos, two turn orders):
# measured on this recipe, shapes take ten times the examples colours do, and motion some 700 video batches.
IMAGE_MIXTURE = {"colour": 400, "shape": 6000, "count": 2000}
NUM_IN_CONTEXT_SAMPLES = 600
NUM_TEXT_SAMPLES = 200
TRAIN = {
    "seed": 0,
    "batch_size": 16,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "train": ["xattn", "perceiver", "embeddings", "lm_head", "lm", "vision"],
}
# Two runs of `otter.train`, the second starting from the first's model. Videos alone first: which way a shape moves
# is learnt in a few hundred batches of videos alone, and within the whole mixture only late and not reliably.
STAGES = [
    {
        "name": "videos",
        "mixture": "video",
        "max_steps": 500,
        "lr": 1e-3,
        "lr_scheduler": "constant",
        "warmup_steps": 50,
    },
    {"name": "all", "mixture": "all", "max_steps": 2800, "lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 100},
]
LOGGING_STEPS = 25  # metrics.jsonl lines (each with the mean loss of its steps); no effect on the weights
EVAL_SEED = 1234  # the held-out questions of the model card (the defaults of `otter eval`)


# ----- tokenizer ---------------------------------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    from otter.data import shapes

    corpus = [question for questions in shapes.QUESTIONS.values() for question in questions]
    corpus += [f"{question} {answer}" for question, answer in shapes.TEXT_FACTS]
    words = [*shapes.COLOURS, *shapes.SHAPES, *shapes.NUMBERS, *shapes.DIRECTIONS]
    corpus += ["User: GPT:", " ".join(words)]
    corpus *= 20  # frequent enough that every word of the task becomes one token
    # Every character once, so any text still tokenizes (character by character) without <unk>.
    corpus.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"-()/")
    return corpus


def build_tokenizer():
    """A byte-for-byte reproducible BPE tokenizer: whole-word tokens for the shapes vocabulary, `<s>` prepended
    (as LLaMA's tokenizer does), the special-token ids of the config."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<PAD>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|endofchunk|>", "<image>", "<answer>"],
        padding_side="left",
        model_max_length=256,
    )
    for expected, token in enumerate(SPECIAL_TOKENS):
        if fast.convert_tokens_to_ids(token) != expected:
            raise RuntimeError(
                f"special token {token!r} got id {fast.convert_tokens_to_ids(token)}, expected {expected}"
            )
    return fast


# ----- steps -------------------------------------------------------------------------------------------------------


def make_data(work_dir: Path) -> dict[str, Path]:
    """The shapes dataset (train split) and the training mixtures: "all" (weighted towards what is slow to learn)
    and "video" (the videos alone)."""
    from otter.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(work_dir / "data", **DATA)
    directory = paths.output_dir
    mixture = yaml.safe_load(paths.train_yaml.read_text())

    # Single-image questions: one dataset per question type (the records' question_type field), so the mixture can
    # weight them: telling shapes apart takes far more examples than telling colours apart.
    records = json.loads((directory / "SHAPES_IMAGE_instructions.json").read_text())["data"]
    image_entry = mixture["IMAGE_TEXT"].pop("SHAPES_IMAGE")
    train_ids = json.loads((directory / "SHAPES_IMAGE_train.json").read_text())
    for question_type, num_samples in IMAGE_MIXTURE.items():
        config_name = f"SHAPES_IMAGE_{question_type}_train.json"
        chosen = {rid: ctx for rid, ctx in train_ids.items() if records[rid]["question_type"] == question_type}
        (directory / config_name).write_text(json.dumps(chosen))
        entry = {**image_entry, "train_config_path": config_name, "num_samples": num_samples}
        mixture["IMAGE_TEXT"][f"SHAPES_IMAGE_{question_type.upper()}"] = entry

    # Each video twice: its colour turn then its motion turn (as generated), and the motion turn first. A model
    # that only ever saw the motion question second would not answer it asked on its own (`otter generate --frames`).
    config_path = directory / "SHAPES_VIDEO_train.json"
    both_orders = {}
    for motion_id, (colour_id,) in json.loads(config_path.read_text()).items():
        both_orders[motion_id] = [colour_id]
        both_orders[colour_id] = [motion_id]
    config_path.write_text(json.dumps(both_orders))

    mixture["IMAGE_TEXT_IN_CONTEXT"]["SHAPES_ICL"]["num_samples"] = NUM_IN_CONTEXT_SAMPLES
    mixture["TEXT_ONLY"]["SHAPES_TEXT"]["num_samples"] = NUM_TEXT_SAMPLES
    paths.train_yaml.write_text(yaml.safe_dump(mixture, sort_keys=False))
    video_yaml = directory / "shapes_train_video.yaml"
    video_yaml.write_text(yaml.safe_dump({"VIDEO_TEXT": mixture["VIDEO_TEXT"]}, sort_keys=False))
    return {"all": paths.train_yaml, "video": video_yaml}


def initial_model(work_dir: Path, tokenizer) -> Path:
    """The randomly initialised model training starts from, initialised for training from scratch rather than for
    fine-tuning (measured on this recipe: colour, shape and motion are learnt several times faster):

    * every linear and convolution weight ~ N(0, 1/fan_in) instead of transformers' N(0, 0.02): with 0.02 a model
      this narrow passes almost nothing of the image through the perceiver (its latents, N(0, 1), dominate);
    * CLIP's position embeddings and the perceiver's frame embeddings ~ N(0, 1) instead of 0.02 and zeros: where
      a shape is and in which frame are what the shape and motion questions are about;
    * the cross-attention gates open (tanh(1)) instead of closed: closed gates protect a pretrained language
      model, and here there is none; they would leave the image pathway without gradients for hundreds of steps.
    """
    from otter import OtterConfig, OtterForConditionalGeneration

    torch.manual_seed(TRAIN["seed"])
    model = OtterForConditionalGeneration(OtterConfig.from_json_file(str(CONFIG_PATH)))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5)
        model.vision_encoder.vision_model.embeddings.position_embedding.weight.normal_(std=1.0)
        model.perceiver.frame_embs.normal_(std=1.0)
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(1.0)
    target = work_dir / "init"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def train(work_dir: Path, initial: Path, mixtures: dict[str, Path]) -> tuple[Path, float, list[dict], list[str]]:
    """Run the training stages; returns the final `hf_model` directory, the seconds spent, the metrics of every
    optimizer step and the command lines."""
    from otter.train import main as train_main

    model, seconds, history, commands = initial, 0.0, [], []
    for stage in STAGES:
        output_dir = work_dir / f"run-{stage['name']}"
        shutil.rmtree(output_dir, ignore_errors=True)
        argv = [
            "--model", str(model),
            "--mimicit-yaml", str(mixtures[stage["mixture"]]),
            "--output-dir", str(output_dir),
            "--batch-size", str(TRAIN["batch_size"]),
            "--max-steps", str(stage["max_steps"]),
            "--lr", str(stage["lr"]),
            "--lr-scheduler", stage["lr_scheduler"],
            "--warmup-steps", str(stage["warmup_steps"]),
            "--weight-decay", str(TRAIN["weight_decay"]),
            "--max-grad-norm", str(TRAIN["max_grad_norm"]),
            "--seed", str(TRAIN["seed"]),
            "--train", *TRAIN["train"],
            "--num-workers", "0",
            "--logging-steps", str(LOGGING_STEPS),
            "--save-hf-model",
            "--no-progress-bar",
        ]  # fmt: skip
        commands.append("python -m otter.train " + " ".join(argv))
        print(commands[-1], flush=True)
        start = time.perf_counter()
        status = train_main(argv)
        if status:
            raise SystemExit(f"otter.train failed (exit status {status}): {commands[-1]}")
        seconds += time.perf_counter() - start
        history += [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        model = output_dir / "hf_model"
    return model, seconds, history, commands


def assemble(hf_model: Path, tokenizer, target: Path) -> None:
    """The shipped directory: model (safetensors), generation config, processor with its tokenizer."""
    from transformers import CLIPImageProcessorPil

    from otter import OtterForConditionalGeneration, OtterProcessor

    model = OtterForConditionalGeneration.from_pretrained(hf_model, dtype=torch.float32)
    size = model.config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = OtterProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if processor.added_tokens:
        raise RuntimeError(f"the tokenizer lacked {processor.added_tokens}")
    processor.resize_model_embeddings(model)
    model.config.name_or_path = MODEL_NAME
    generation = model.generation_config
    generation.do_sample = False
    generation.num_beams = 1
    generation.max_new_tokens = 16
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)


def evaluate(model_dir: Path, work_dir: Path):
    from otter.data import load_mixture_yaml
    from otter.default import load_pretrained
    from otter.evaluate import evaluate as run_evaluation
    from otter.evaluate import load_question_set, make_shapes_eval_set

    yaml_path = make_shapes_eval_set(work_dir / "heldout", seed=EVAL_SEED)
    model, processor = load_pretrained(model_dir)
    questions = load_question_set(
        load_mixture_yaml(yaml_path),
        max_frames=model.config.max_num_frames,
        all_turns=True,
        image_index_cache=work_dir / "heldout" / "image_index",
    )
    return run_evaluation(model, processor, questions, batch_size=32)


def model_card(config: dict, result, train_seconds: float, history: list[dict], num_params: int, size: int) -> str:
    text, vision = config["text_config"], config["vision_config"]
    summary = result.summary()
    rows = [f"| all | {result.correct} / {len(result.predictions)} | **{result.accuracy:.1%}** |"]
    for title, key in (("dataset", "by_source"), ("question type", "by_group")):
        for name, counts in summary[key].items():
            rows.append(
                f"| {title}: {name} | {counts['correct']} / {counts['total']} | {counts['correct'] / counts['total']:.1%} |"
            )
    table = "\n".join(rows)
    last_loss = history[-1].get("loss_mean", history[-1]["loss"])  # mean over the last logging window
    train_flags = " ".join(TRAIN["train"])
    stages = "\n".join(
        f"   - {stage['name']}: the {'videos alone' if stage['mixture'] == 'video' else 'whole mixture'}, "
        f"`--max-steps {stage['max_steps']} --lr {stage['lr']} --lr-scheduler {stage['lr_scheduler']} "
        f"--warmup-steps {stage['warmup_steps']}`;"
        for stage in STAGES
    )
    mixture = ", ".join(
        [f"{count} {kind} questions" for kind, count in IMAGE_MIXTURE.items()]
        + [f"{NUM_IN_CONTEXT_SAMPLES} in-context samples (3 questions each)", f"{NUM_TEXT_SAMPLES} text-only questions"]
    )
    return f"""---
library_name: transformers
license: mit
pipeline_tag: image-text-to-text
tags: [otter, openflamingo, tiny, synthetic]
---

# {MODEL_NAME}

The embedded default model of otter-flamingo: a tiny Otter ({num_params / 1e6:.2f}M parameters,
{size / 2**20:.1f} MiB of float32 safetensors) trained from scratch, on CPU, by this project's own training loop
on its synthetic **shapes** dataset. It exists so that `otter generate`, `otter chat`, the notebook and `make run` work
offline with no download. It knows coloured shapes and nothing else.

**Held-out accuracy: {result.accuracy:.1%}** ({result.correct} of {len(result.predictions)} questions about images
it never saw, drawn with seed {EVAL_SEED}; the training images were drawn with seed {DATA["seed"]}).

## What it answers

Images of one to four flat shapes (circle, square, triangle; red, green, blue, yellow, purple, orange) on a light
background, and short videos (frames) of one shape moving in a straight line, in Otter's prompt format
`<image>User: {{question}} GPT:<answer>`:

- "What colour is the shape?" / "What colour is it?" -> `red`, `green`, ...
- "What shape is it?" / "What shape is this?" -> `circle`, `square`, `triangle`
- "How many shapes are there?" -> `one` ... `four`
- with in-context examples (each with its own image) before the question;
- a video (one `<image>` for all frames): "What colour is the moving shape?" then "Which way does it move?"
  -> `left`, `right`, `up`, `down`.

```python
import otter
from PIL import Image

model, processor = otter.load_default()
inputs = processor(text=processor.build_prompt("What colour is the shape?"), images=[Image.open("red_circle.png")])
print(processor.decode_answer(model.generate(**inputs)[0]))  # red
```

## How it was made

`python scripts/build_default_model.py` (seeded; one CPU thread; {train_seconds / 60:.1f} min of training here):

1. **Tokenizer**: BPE with {TOKENIZER_VOCAB} entries trained on the shapes vocabulary (every task word is one token,
   any other text falls back to characters); `<PAD>` 0, `<s>` 1, `</s>` 2, `<|endofchunk|>` 3, `<image>` 4,
   `<answer>` 5, `<unk>` 6; `<s>` is prepended.
2. **Data**: `otter.data.shapes.make_shapes_dataset(seed={DATA["seed"]}, image_size={DATA["image_size"]},
   num_image={DATA["num_image"]}, num_in_context={DATA["num_in_context"]}, num_videos={DATA["num_videos"]},
   frames={DATA["frames"]})`, train split, in MIMIC-IT files. The mixture YAML weights what is slow to learn: per
   epoch {mixture}; every video twice (its colour turn first, and its motion turn first).
3. **Model**: `configs/{MODEL_NAME}.json`: CLIP vision tower {vision["num_hidden_layers"]} layers x
   {vision["hidden_size"]} ({vision["image_size"]} px, {vision["patch_size"]} px patches), perceiver
   {config["perceiver_depth"]} layers x {config["perceiver_num_latents"]} latents, LLaMA {text["num_hidden_layers"]}
   layers x {text["hidden_size"]} with gated cross-attention every {config["cross_attn_every_n_layers"]} layer(s),
   vocabulary {text["vocab_size"]}, up to {config["max_num_frames"]} frames, attend-previous (Otter) semantics.
   Initialised for training from scratch: linear and convolution weights N(0, 1/fan_in), CLIP position embeddings
   and perceiver frame embeddings N(0, 1), cross-attention gates open (1.0).
4. **Training**: two runs of `python -m otter.train --train {train_flags} --batch-size {TRAIN["batch_size"]}
   --weight-decay {TRAIN["weight_decay"]} --max-grad-norm {TRAIN["max_grad_norm"]} --seed {TRAIN["seed"]}` (every
   parameter trains: nothing was pretrained), the second starting from the first's model:
{stages}
   Final training loss {last_loss:.4f} (mean of the last {LOGGING_STEPS} steps).
5. **Evaluation**: `otter.evaluate` on a held-out shapes split drawn with seed {EVAL_SEED} (every turn of the video
   conversations asked, earlier turns given), greedy decoding, exact match after normalisation:

| questions | correct | accuracy |
|---|---|---|
{table}

Reproduce the evaluation with `otter eval` (the same held-out split: `--shapes-seed {EVAL_SEED}`).

Built with torch {torch.__version__}, Python {platform.python_version()}.

## Limitations

A toy: {num_params / 1e6:.2f}M parameters that have seen nothing but the shapes dataset. Other questions, real photos,
other phrasings ("color") get confident nonsense. Use it to try the library, not to answer questions.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the model directory to (re)place")
    parser.add_argument("--work-dir", type=Path, help="keep the dataset and training run here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it)")
    parser.add_argument("--min-accuracy", type=float, default=0.9, help="refuse to install a model scoring less")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="otter-default-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer()
        tokenizer_dir = work_dir / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        config = json.loads(CONFIG_PATH.read_text())
        if config["text_config"]["vocab_size"] != len(tokenizer):
            raise RuntimeError(f"{CONFIG_PATH}: vocab_size must be {len(tokenizer)} (the tokenizer's size)")
        mixtures = make_data(work_dir)
        initial = initial_model(work_dir, tokenizer)
        hf_model, train_seconds, history, _ = train(work_dir, initial, mixtures)

        output = args.output.resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        try:
            assemble(hf_model, tokenizer, staging)
            result = evaluate(staging, work_dir)
            print(result.format_table(), flush=True)
            num_params = sum(tensor.numel() for tensor in load_file(staging / "model.safetensors").values())
            size = (staging / "model.safetensors").stat().st_size
            card = model_card(config, result, train_seconds, history, num_params, size)
            (staging / "README.md").write_text(card)
            (staging / "eval_results.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
            if result.accuracy < args.min_accuracy:
                raise SystemExit(
                    f"held-out accuracy {result.accuracy:.1%} < --min-accuracy {args.min_accuracy:.0%}: "
                    f"{output} left as it was"
                )
            os.chmod(staging, 0o755)
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if output.exists():
                os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    total = sum(p.stat().st_size for p in output.iterdir())
    print(
        f"wrote {output} ({total / 2**20:.2f} MiB): held-out accuracy {result.accuracy:.1%}, "
        f"training {train_seconds / 60:.1f} min, total {(time.perf_counter() - start) / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
