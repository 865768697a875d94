"""Score a model on a MIMIC-IT question set: `otter eval`.

    otter eval                                        # the embedded model on a fresh held-out shapes split
    otter eval --model DIR --mimicit-yaml data/shapes_val.yaml --output predictions.jsonl
    otter eval --model DIR --instructions X_instructions.json --images X.json --train-config X_val.json

Every id of the train-config JSON (the keys) is a question: its in-context ids come first, as examples with their
answers (each with its own image for in-context tasks; earlier turns of a conversation about the same image or video
for image and video tasks), then the question, in Otter's prompt format. The model answers greedily, and an answer
counts as correct when it equals the reference after normalisation (case, surrounding whitespace and trailing
punctuation ignored). `--all-turns` also asks every in-context turn of an image or video conversation, given the
turns before it. Accuracy is printed overall, per dataset and per question type (the records' `question_type`
field, or `--group-by FIELD`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from otter.data import (
    BadRecords,
    DataError,
    ImageStore,
    MimicitSource,
    TaskType,
    load_instructions,
    load_mixture_yaml,
    load_train_config,
    open_image_store,
    resample_frames,
)

logger = logging.get_logger(__name__)

#: Held-out shapes questions of `otter eval` with no data option: a seed the default model was not trained on.
DEFAULT_SHAPES_SEED = 1234
#: The pixel size the shapes images are drawn at (the processor resizes them to the model's input size).
DEFAULT_SHAPES_IMAGE_SIZE = 64


@dataclass(frozen=True)
class Question:
    """One question to ask: earlier turns (`history`, answered), then `question`; `media` holds the image ids of each
    `<image>` of the prompt (its frames), in prompt order."""

    id: str
    source: str
    task_type: TaskType
    question: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()
    media: tuple[tuple[str, ...], ...] = ()
    group: str | None = None


@dataclass
class QuestionSet:
    questions: list[Question]
    stores: dict[str, ImageStore | None]  # source name -> its images

    def __len__(self) -> int:
        return len(self.questions)

    def load_media(self, question: Question) -> list[list]:
        store = self.stores[question.source]
        return [[store.load(image_id) for image_id in frames] for frames in question.media]


@dataclass
class EvalResult:
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def correct(self) -> int:
        return sum(p["correct"] for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.predictions) if self.predictions else 0.0

    def breakdown(self, key: str) -> dict[str, tuple[int, int]]:
        """{value of `key`: (correct, total)} over the predictions, in first-seen order."""
        counts: dict[str, list[int]] = {}
        for prediction in self.predictions:
            entry = counts.setdefault(str(prediction.get(key)), [0, 0])
            entry[0] += int(prediction["correct"])
            entry[1] += 1
        return {name: (correct, total) for name, (correct, total) in counts.items()}

    def summary(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": len(self.predictions),
            "by_source": {k: {"correct": c, "total": t} for k, (c, t) in self.breakdown("source").items()},
            "by_group": {k: {"correct": c, "total": t} for k, (c, t) in self.breakdown("group").items() if k != "None"},
        }

    def format_table(self) -> str:
        lines = [f"{'':24} {'correct':>9} {'total':>7} {'accuracy':>9}"]
        sections = [("dataset", self.breakdown("source")), ("question type", self.breakdown("group"))]
        for title, rows in sections:
            rows = {name: value for name, value in rows.items() if name != "None"}
            if not rows:
                continue
            lines.append(f"{title}:")
            for name, (correct, total) in rows.items():
                lines.append(f"  {name:22} {correct:9d} {total:7d} {correct / total:9.1%}")
        lines.append(f"{'all':24} {self.correct:9d} {len(self.predictions):7d} {self.accuracy:9.1%}")
        return "\n".join(lines)


# ----- questions ---------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing punctuation."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(" .!?,;:").strip()


def _read_groups(path: Path, field_name: str) -> dict[str, str]:
    with open(path, "rb") as handle:
        data = json.load(handle).get("data", {})
    return {rid: str(rec[field_name]) for rid, rec in data.items() if isinstance(rec, dict) and field_name in rec}


def load_question_set(
    sources: Sequence[MimicitSource],
    *,
    max_frames: int | None = None,
    all_turns: bool = False,
    group_by: str | None = "question_type",
    max_samples: int | None = None,
    image_index_cache: str | os.PathLike | None = None,
) -> QuestionSet:
    """The questions of MIMIC-IT sources (their train-config ids; every instruction id when a source has none).
    `max_samples` keeps the first questions of each source. Records missing from the instruction file, or images
    missing from the images file, raise a `DataError` naming the file."""
    questions: list[Question] = []
    stores: dict[str, ImageStore | None] = {}
    opened: dict[Path, ImageStore] = {}
    for source in sources:
        records = load_instructions(source.mimicit_path, BadRecords())
        if source.train_config_path is not None:
            config = load_train_config(source.train_config_path)
        else:
            config = {record_id: () for record_id in records}
        groups = _read_groups(Path(source.mimicit_path), group_by) if group_by else {}
        store = None
        if source.task_type != TaskType.TEXT:
            if source.images_path is None:
                raise DataError(f"source {source.name!r} needs an images file", source.mimicit_path)
            key = Path(source.images_path).resolve()
            if key not in opened:
                opened[key] = open_image_store(source.images_path, cache_dir=image_index_cache)
            store = opened[key]
        stores[source.name] = store
        count = 0
        for query_id, context_ids in config.items():
            if max_samples is not None and count >= max_samples:
                break
            for record_id in (*context_ids, query_id):
                if record_id not in records:
                    raise DataError(f"id {record_id!r} not found in {source.mimicit_path}", source.train_config_path)
            turns = [records[record_id] for record_id in (*context_ids, query_id)]
            if source.task_type == TaskType.IN_CONTEXT:
                media = tuple(resample_frames(record.image_ids, max_frames) for record in turns)
            elif source.task_type == TaskType.TEXT:
                media = ()
            else:
                media = (resample_frames(records[query_id].image_ids, max_frames),)
            for frames in media:
                if not frames:
                    raise DataError("no image_ids, but the task needs images", source.mimicit_path, query_id)
                missing = [image_id for image_id in frames if image_id not in store]
                if missing:
                    raise DataError(f"image id {missing[0]!r} not found in {store.path}", source.mimicit_path, query_id)
            if len({len(frames) for frames in media}) > 1:
                raise DataError("in-context examples have different numbers of frames", source.mimicit_path, query_id)
            asked = range(len(turns)) if all_turns and source.task_type in (TaskType.IMAGE, TaskType.VIDEO) else [-1]
            for index in asked:
                index %= len(turns)
                record = turns[index]
                history = tuple((turn.instruction, turn.answer) for turn in turns[:index])
                turn_media = media[: index + 1] if source.task_type == TaskType.IN_CONTEXT else media
                questions.append(
                    Question(
                        id=record.id,
                        source=source.name,
                        task_type=source.task_type,
                        question=record.instruction,
                        answer=record.answer,
                        history=history,
                        media=turn_media,
                        group=groups.get(record.id),
                    )
                )
            count += 1
    return QuestionSet(questions, stores)


def build_prompt(processor, question: Question) -> str:
    """The Otter prompt of a question (see `OtterProcessor.build_prompt` / `build_video_prompt`)."""
    if question.task_type == TaskType.IN_CONTEXT:
        return processor.build_prompt(question.question, in_context=list(question.history))
    prompt = processor.build_video_prompt(question.question, in_context=list(question.history))
    if question.task_type == TaskType.TEXT:
        prompt = prompt[len(processor.media_token) :]
    return prompt


def encode(processor, prompts: list[str], media: list[list[list]]):
    """Processor inputs for prompts whose media (per prompt: per `<image>`: its frames) have the same shape."""
    num_media = len(media[0])
    num_frames = len(media[0][0]) if num_media else 0
    if num_media == 0:
        return processor(text=prompts, return_tensors="pt")
    if num_frames == 1:
        return processor(text=prompts, images=[[frames[0] for frames in sample] for sample in media])
    if num_media == 1:
        return processor(text=prompts, videos=[sample[0] for sample in media])
    # Several images with several frames each (in-context videos): the processor takes one or the other.
    inputs = processor(text=prompts, return_tensors="pt")
    flat = [frame for sample in media for frames in sample for frame in frames]
    pixels = processor.image_processor(flat, return_tensors="pt")["pixel_values"]
    inputs["vision_x"] = pixels.reshape(len(media), num_media, num_frames, *pixels.shape[1:])
    return inputs


def _batches(questions: list[Question], batch_size: int) -> Iterable[list[int]]:
    """Indices of questions in batches whose media have one shape (as many images, as many frames)."""
    shapes: dict[tuple[int, int], list[int]] = {}
    for index, question in enumerate(questions):
        frames = len(question.media[0]) if question.media else 0
        shapes.setdefault((len(question.media), frames), []).append(index)
    for members in shapes.values():
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


@torch.no_grad()
def evaluate(
    model,
    processor,
    question_set: QuestionSet,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    num_beams: int = 1,
) -> EvalResult:
    """Answer every question greedily (or with beam search) and score it by normalised exact match."""
    start = time.perf_counter()
    questions = question_set.questions
    predictions: list[dict | None] = [None] * len(questions)
    model.eval()
    for done, indices in enumerate(_batches(questions, batch_size)):
        batch = [questions[i] for i in indices]
        inputs = encode(
            processor, [build_prompt(processor, q) for q in batch], [question_set.load_media(q) for q in batch]
        )
        inputs = inputs.to(model.device)
        if "vision_x" in inputs:
            inputs["vision_x"] = inputs["vision_x"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        answers = processor.decode_answer(output)
        for index, question, answer in zip(indices, batch, answers, strict=True):
            predictions[index] = {
                "id": question.id,
                "source": question.source,
                "group": question.group,
                "question": question.question,
                "history": [list(turn) for turn in question.history],
                "answer": question.answer,
                "prediction": answer,
                "correct": normalize_answer(answer) == normalize_answer(question.answer),
            }
        if done % 10 == 0:
            logger.info(f"evaluated {sum(p is not None for p in predictions)} of {len(questions)} questions")
    return EvalResult(predictions, time.perf_counter() - start)


# ----- held-out shapes ---------------------------------------------------------------------------------------------


def make_shapes_eval_set(
    output_dir: str | os.PathLike,
    *,
    seed: int = DEFAULT_SHAPES_SEED,
    image_size: int = DEFAULT_SHAPES_IMAGE_SIZE,
    num_image: int = 150,
    num_in_context: int = 50,
    num_videos: int = 50,
    frames: int = 4,
) -> Path:
    """Write a shapes dataset whose held-out split has `num_image` single-image, `num_in_context` in-context and
    `num_videos` video questions (new images drawn with `seed`) and return its held-out mixture YAML."""
    from otter.data.shapes import make_shapes_dataset

    # make_shapes_dataset sizes the held-out split relative to the train split (here: as large, and not used).
    paths = make_shapes_dataset(
        output_dir,
        seed=seed,
        image_size=image_size,
        num_image=num_image,
        num_in_context=num_in_context,
        num_videos=num_videos,
        frames=frames,
        val_fraction=1.0,
    )
    return paths.val_yaml


# ----- command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otter eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="HF model directory or Hub id (default: the embedded model)")
    data = parser.add_argument_group("questions (default: a held-out shapes split, generated on the fly)")
    data.add_argument("--mimicit-yaml", type=Path, help="mixture YAML of MIMIC-IT question sets")
    data.add_argument("--instructions", type=Path, help="an instruction JSON (instead of --mimicit-yaml)")
    data.add_argument("--images", type=Path, help="its images JSON or parquet")
    data.add_argument("--train-config", type=Path, help="its question ids with their in-context ids (default: all)")
    data.add_argument(
        "--task-type", choices=[t.value for t in TaskType], default="image", help="layout of --instructions"
    )
    data.add_argument("--shapes-seed", type=int, default=DEFAULT_SHAPES_SEED, help="seed of the generated shapes split")
    data.add_argument("--shapes-image-size", type=int, default=DEFAULT_SHAPES_IMAGE_SIZE, help="pixels")
    data.add_argument(
        "--shapes-count",
        type=int,
        default=150,
        help="single-image shapes questions (and a third as many in-context and video ones)",
    )
    data.add_argument("--max-samples", type=int, help="at most this many questions per dataset")
    data.add_argument(
        "--all-turns",
        action="store_true",
        help="also ask the earlier turns of image/video conversations (default with the shapes split)",
    )
    data.add_argument(
        "--group-by", default="question_type", help="record field for the per-type accuracy ('' for none)"
    )
    data.add_argument("--max-frames", type=int, help="resample videos to at most this many frames (default: config)")
    run = parser.add_argument_group("generation and output")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--num-beams", type=int, default=1)
    run.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    run.add_argument("--output", type=Path, help="write every prediction to this JSONL file")
    run.add_argument("--summary-json", type=Path, help="write the accuracy figures to this JSON file")
    run.add_argument("--min-accuracy", type=float, help="exit with status 1 when the accuracy is lower")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _sources(args, work_dir: Path) -> list[MimicitSource]:
    if args.mimicit_yaml is not None and args.instructions is not None:
        raise ValueError("--mimicit-yaml and --instructions are alternatives")
    if args.mimicit_yaml is not None:
        return load_mixture_yaml(args.mimicit_yaml)
    if args.instructions is not None:
        task_type = TaskType(args.task_type)
        if args.images is None and task_type != TaskType.TEXT:
            raise ValueError(f"--task-type {task_type.value} needs --images")
        for option, path in (
            ("--instructions", args.instructions),
            ("--images", args.images),
            ("--train-config", args.train_config),
        ):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{option}: file not found: {path}")
        return [MimicitSource(args.instructions.stem, task_type, args.instructions, args.images, args.train_config)]
    count = max(args.shapes_count, 3)
    yaml_path = make_shapes_eval_set(
        work_dir / "shapes",
        seed=args.shapes_seed,
        image_size=args.shapes_image_size,
        num_image=count,
        num_in_context=count // 3,
        num_videos=count // 3,
    )
    args.all_turns = True
    return load_mixture_yaml(yaml_path)


def run(args: argparse.Namespace) -> EvalResult:
    from otter.default import default_model_path, load_pretrained

    model_path = args.model if args.model is not None else default_model_path()
    from otter.cli import UsageError, check_device, is_missing_model

    if args.model is not None and is_missing_model(args.model):
        raise FileNotFoundError(f"model not found: {args.model} (expected an HF model directory or a Hub id)")
    if args.device is not None:
        try:
            check_device(args.device)
        except UsageError as error:
            raise ValueError(str(error)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="otter-eval-") as work_dir:
        sources = _sources(args, Path(work_dir))
        model, processor = load_pretrained(model_path, device=device)
        max_frames = args.max_frames or getattr(model.config, "max_num_frames", None)
        question_set = load_question_set(
            sources,
            max_frames=max_frames,
            all_turns=args.all_turns,
            group_by=args.group_by or None,
            max_samples=args.max_samples,
            image_index_cache=Path(work_dir) / "image_index",
        )
        if not question_set.questions:
            raise ValueError("no questions to ask")
        print(f"model: {model_path}", flush=True)
        print(f"questions: {len(question_set)} from {', '.join(s.name for s in sources)}", flush=True)
        return evaluate(
            model,
            processor,
            question_set,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            print(f"otter eval: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        result = run(args)
    except (DataError, OSError, ValueError) as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"otter eval: error: {message}", file=sys.stderr)
        return 2
    print(result.format_table())
    print(f"accuracy: {result.accuracy:.4f} ({result.correct}/{len(result.predictions)}) in {result.seconds:.1f}s")
    if args.output is not None:
        _atomic_write(args.output, "".join(json.dumps(p) + "\n" for p in result.predictions))
    if args.summary_json is not None:
        _atomic_write(args.summary_json, json.dumps(result.summary(), indent=2) + "\n")
    if args.min_accuracy is not None and result.accuracy < args.min_accuracy:
        print(
            f"otter eval: accuracy {result.accuracy:.4f} is below --min-accuracy {args.min_accuracy}", file=sys.stderr
        )
        return 1
    return 0


__all__ = [
    "DEFAULT_SHAPES_SEED",
    "EvalResult",
    "Question",
    "QuestionSet",
    "build_prompt",
    "encode",
    "evaluate",
    "load_question_set",
    "main",
    "make_shapes_eval_set",
    "normalize_answer",
]

if __name__ == "__main__":
    raise SystemExit(main())
