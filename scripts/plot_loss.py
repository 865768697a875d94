"""Draw the training loss of one or more `otter.train` runs (their `metrics.jsonl`) as a PNG, with Pillow only.

    python scripts/plot_loss.py runs/default/run-videos/metrics.jsonl runs/default/run-all/metrics.jsonl \
        --output docs/shapes_loss.png --title "otter-tiny-shapes"

Runs given in order are drawn one after the other on a shared step axis (a second stage continues the first). Each
point is a line's `loss_mean` (the mean over the steps since the line before), or its `loss` in older files. The loss
axis is logarithmic, since the loss spans several orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 900, 480
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 50
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def read_runs(paths: list[Path]) -> list[tuple[str, list[tuple[int, float]]]]:
    """[(label, [(global step, loss)])], steps of later runs offset by the last step of the earlier ones."""
    runs, offset = [], 0
    for path in paths:
        points = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                entry = json.loads(line)
                points.append((offset + int(entry["step"]), float(entry.get("loss_mean", entry["loss"]))))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: expected a JSON object with step and loss ({error})") from error
        if not points:
            raise ValueError(f"{path}: no metrics")
        runs.append((path.parent.name, points))
        offset = points[-1][0]
    return runs


def draw(runs: list[tuple[str, list[tuple[int, float]]]], title: str) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    canvas = ImageDraw.Draw(image)
    steps = [step for _, points in runs for step, _ in points]
    losses = [max(loss, 1e-6) for _, points in runs for _, loss in points]
    low, high = math.floor(math.log10(min(losses))), math.ceil(math.log10(max(losses)))
    high = max(high, low + 1)
    last_step = max(steps)
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x_of(step: float) -> float:
        return MARGIN_LEFT + plot_w * step / last_step

    def y_of(loss: float) -> float:
        return MARGIN_TOP + plot_h * (high - math.log10(max(loss, 1e-6))) / (high - low)

    canvas.rectangle([MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM], outline="black")
    for exponent in range(low, high + 1):
        y = y_of(10**exponent)
        canvas.line([MARGIN_LEFT, y, WIDTH - MARGIN_RIGHT, y], fill=(225, 225, 225))
        canvas.text((8, y - 6), f"1e{exponent}", fill="black")
    for tick in range(0, last_step + 1, max(100, int(round(last_step / 8, -2)))):
        x = x_of(tick)
        canvas.line([x, HEIGHT - MARGIN_BOTTOM, x, HEIGHT - MARGIN_BOTTOM + 5], fill="black")
        canvas.text((x - 12, HEIGHT - MARGIN_BOTTOM + 8), str(tick), fill="black")
    canvas.text((WIDTH / 2 - 40, HEIGHT - 20), "optimizer step", fill="black")
    canvas.text((MARGIN_LEFT, 12), f"{title}: training loss (log scale)", fill="black")
    for index, (label, points) in enumerate(runs):
        colour = COLOURS[index % len(COLOURS)]
        canvas.line([(x_of(step), y_of(loss)) for step, loss in points], fill=colour, width=2)
        canvas.text((WIDTH - MARGIN_RIGHT - 160, MARGIN_TOP + 10 + 16 * index), f"-- {label}", fill=colour)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files, in training order")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="training")
    args = parser.parse_args(argv)
    image = draw(read_runs(args.metrics), args.title)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=args.output.parent)
    os.close(handle)
    image.save(temporary)
    os.replace(temporary, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
