"""A synthetic MIMIC-IT dataset of coloured shapes, for tests and for a CPU-sized learning proof.

`make_shapes_dataset(output_dir, seed=0)` writes, in the real MIMIC-IT formats:

* `SHAPES_images.json` (`{image_id: urlsafe-base64 PNG}`) or `SHAPES_images.parquet` (`id`, `base64` columns);
* per task an instruction JSON `SHAPES_<TASK>_instructions.json` and two train configs,
  `SHAPES_<TASK>_train.json` and `SHAPES_<TASK>_val.json` (held-out: new images, same question types);
* `shapes_train.yaml` and `shapes_val.yaml`, the mixtures for training and evaluation.

Tasks: `SHAPES_IMAGE` (IMAGE_TEXT: "What colour is the shape?", "What shape is it?", "How many shapes are there?"),
`SHAPES_ICL` (IMAGE_TEXT_IN_CONTEXT: a query and two in-context examples of the same question type, each with its
own image), `SHAPES_VIDEO` (VIDEO_TEXT: a shape moving across `frames` frames; "Which way does it move?" and its
colour, as a two-turn conversation) and `SHAPES_TEXT` (TEXT_ONLY, train split only). Every record has an extra
`question_type` field (readers ignore unknown fields) for per-type accuracy. The output is a pure function of the
arguments (no timestamps).
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (250, 245, 230))

QUESTIONS = {
    "colour": ("What colour is the shape?", "What colour is it?"),
    "shape": ("What shape is it?", "What shape is this?"),
    "count": ("How many shapes are there?",),
    "motion": ("Which way does it move?",),
    "video_colour": ("What colour is the moving shape?",),
}
TEXT_FACTS = (
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of down?", "up"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What comes after one?", "two"),
    ("What comes after two?", "three"),
)
META = {"version": "0.1", "time": "synthetic", "author": "otter-flamingo shapes generator"}


@dataclass(frozen=True)
class ShapesPaths:
    output_dir: Path
    images: Path
    train_yaml: Path
    val_yaml: Path


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, colour) -> None:
    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif kind == "square":
        side = radius * 0.9
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=colour)
    elif kind == "triangle":
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=colour
        )
    else:
        raise ValueError(f"unknown shape {kind!r}")


def render(size: int, background, shapes: list[tuple[str, str, float, float, float]]) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for kind, colour, cx, cy, radius in shapes:
        draw_shape(draw, kind, cx, cy, radius, COLOURS[colour])
    return image


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.urlsafe_b64encode(buffer.getvalue()).decode("ascii")


class _Builder:
    def __init__(self, seed: int, size: int):
        self.rng = random.Random(seed)
        self.size = size
        self.images: dict[str, str] = {}

    def add_image(self, image: Image.Image) -> str:
        image_id = f"SHAPES_IMG_{len(self.images):06d}"
        self.images[image_id] = encode_png(image)
        return image_id

    def single_shape(self) -> tuple[str, str, str]:
        """An image with one shape: (image id, colour, shape)."""
        rng, size = self.rng, self.size
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        radius = rng.uniform(0.2, 0.3) * size
        cx = rng.uniform(radius + 1, size - radius - 1)
        cy = rng.uniform(radius + 1, size - radius - 1)
        return self.add_image(render(size, rng.choice(BACKGROUNDS), [(kind, colour, cx, cy, radius)])), colour, kind

    def several_shapes(self) -> tuple[str, int]:
        """An image with 1 to 4 shapes, one per quadrant: (image id, count)."""
        rng, size = self.rng, self.size
        count = rng.randint(1, 4)
        cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], count)
        half = size / 2
        shapes = []
        for row, col in cells:
            radius = rng.uniform(0.14, 0.2) * size
            cx = col * half + rng.uniform(radius + 0.5, half - radius - 0.5)
            cy = row * half + rng.uniform(radius + 0.5, half - radius - 0.5)
            shapes.append((rng.choice(SHAPES), rng.choice(list(COLOURS)), cx, cy, radius))
        return self.add_image(render(size, rng.choice(BACKGROUNDS), shapes)), count

    def video(self, frames: int) -> tuple[list[str], str, str]:
        """A shape moving in a straight line: (frame ids, direction, colour)."""
        rng, size = self.rng, self.size
        kind, colour, direction = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(DIRECTIONS)
        background = rng.choice(BACKGROUNDS)
        radius = 0.15 * size
        travel = size - 2 * radius - 2
        step = travel / max(frames - 1, 1)
        across = rng.uniform(radius + 1, size - radius - 1)
        ids = []
        for frame in range(frames):
            along = radius + 1 + step * frame
            if direction in ("left", "up"):
                along = size - along
            cx, cy = (along, across) if direction in ("left", "right") else (across, along)
            ids.append(self.add_image(render(size, background, [(kind, colour, cx, cy, radius)])))
        return ids, direction, colour

    def question(self, question_type: str) -> str:
        return self.rng.choice(QUESTIONS[question_type])

    def image_question(self, question_type: str) -> tuple[str, str, list[str]]:
        """(instruction, answer, image ids) for a colour/shape/count question about a new image."""
        if question_type == "count":
            image_id, count = self.several_shapes()
            return self.question("count"), NUMBERS[count], [image_id]
        image_id, colour, kind = self.single_shape()
        answer = colour if question_type == "colour" else kind
        return self.question(question_type), answer, [image_id]


def _record(instruction: str, answer: str, image_ids: list[str], question_type: str, rel=()) -> dict:
    return {
        "instruction": instruction,
        "answer": answer,
        "image_ids": list(image_ids),
        "rel_ins_ids": list(rel),
        "question_type": question_type,
    }


def _write_json(path: Path, content) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=None, separators=(",", ":"))


def make_shapes_dataset(
    output_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    num_image: int = 240,
    num_in_context: int = 90,
    num_videos: int = 60,
    frames: int = 4,
    val_fraction: float = 0.25,
    images_format: str = "json",
    parquet_row_group_size: int = 64,
) -> ShapesPaths:
    """Write the shapes dataset to `output_dir` (created) and return its main paths. Counts are for the train
    split; the held-out split adds `val_fraction` as many, on new images."""
    if images_format not in ("json", "parquet"):
        raise ValueError(f"images_format must be 'json' or 'parquet', got {images_format!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    builder = _Builder(seed, image_size)
    splits = {"train": 1.0, "val": val_fraction}
    image_types = ("colour", "shape", "count")

    # Single-image questions.
    data, configs = {}, {split: {} for split in splits}
    for split, fraction in splits.items():
        for number in range(max(1, round(num_image * fraction))):
            question_type = image_types[number % len(image_types)]
            instruction, answer, image_ids = builder.image_question(question_type)
            record_id = f"SHAPES_IMAGE_{split}_{number:05d}"
            data[record_id] = _record(instruction, answer, image_ids, question_type)
            configs[split][record_id] = []
    tasks = {"SHAPES_IMAGE": ("IMAGE_TEXT", data, configs)}

    # In-context: each query with two examples of the same question type, each with its own image.
    data, configs = {}, {split: {} for split in splits}
    for split, fraction in splits.items():
        for number in range(max(1, round(num_in_context * fraction))):
            question_type = image_types[number % len(image_types)]
            ids = []
            for part in ("q", "c0", "c1"):
                instruction, answer, image_ids = builder.image_question(question_type)
                record_id = f"SHAPES_ICL_{split}_{number:05d}_{part}"
                data[record_id] = _record(instruction, answer, image_ids, question_type)
                ids.append(record_id)
            for record_id in ids:
                data[record_id]["rel_ins_ids"] = [other for other in ids if other != record_id]
            configs[split][ids[0]] = ids[1:]
    tasks["SHAPES_ICL"] = ("IMAGE_TEXT_IN_CONTEXT", data, configs)

    # Videos: frames on F; a colour turn then the motion question (the query).
    data, configs = {}, {split: {} for split in splits}
    for split, fraction in splits.items():
        for number in range(max(1, round(num_videos * fraction))):
            frame_ids, direction, colour = builder.video(frames)
            motion_id = f"SHAPES_VIDEO_{split}_{number:05d}_motion"
            colour_id = f"SHAPES_VIDEO_{split}_{number:05d}_colour"
            data[motion_id] = _record(builder.question("motion"), direction, frame_ids, "motion", [colour_id])
            data[colour_id] = _record(builder.question("video_colour"), colour, frame_ids, "video_colour", [motion_id])
            configs[split][motion_id] = [colour_id]
    tasks["SHAPES_VIDEO"] = ("VIDEO_TEXT", data, configs)

    # Text only (train split only: there is nothing to hold out).
    data = {f"SHAPES_TEXT_{n:05d}": _record(q, a, [], "text") for n, (q, a) in enumerate(TEXT_FACTS)}
    tasks["SHAPES_TEXT"] = ("TEXT_ONLY", data, {"train": {record_id: [] for record_id in data}, "val": {}})

    # Images.
    if images_format == "json":
        images_path = output_dir / "SHAPES_images.json"
        _write_json(images_path, builder.images)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        images_path = output_dir / "SHAPES_images.parquet"
        table = pa.table({"id": list(builder.images), "base64": list(builder.images.values())})
        pq.write_table(table, images_path, row_group_size=parquet_row_group_size)

    # Instruction files, train configs and the two mixtures.
    mixtures = {split: {} for split in splits}
    for task, (group, data, configs) in tasks.items():
        _write_json(output_dir / f"{task}_instructions.json", {"meta": META, "data": data})
        for split in splits:
            if not configs[split]:
                continue
            _write_json(output_dir / f"{task}_{split}.json", configs[split])
            entry = {
                "mimicit_path": f"{task}_instructions.json",
                "train_config_path": f"{task}_{split}.json",
                "num_samples": -1,
            }
            if group != "TEXT_ONLY":
                entry["images_path"] = images_path.name
            mixtures[split].setdefault(group, {})[task] = entry
    import yaml

    yaml_paths = {}
    for split, mixture in mixtures.items():
        yaml_paths[split] = output_dir / f"shapes_{split}.yaml"
        with open(yaml_paths[split], "w") as handle:
            yaml.safe_dump(mixture, handle, sort_keys=False)
    return ShapesPaths(output_dir, images_path, yaml_paths["train"], yaml_paths["val"])
