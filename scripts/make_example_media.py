"""Draw the bundled example images and video frames in `examples/` (224 x 224 PNGs, drawn like the shapes dataset,
`otter.data.shapes`, so the embedded model knows them):

* `examples/images/{green_triangle,yellow_circle,purple_square,orange_triangle,three_shapes}.png`;
* `examples/frames/purple_circle_moving_right/frame_{0..3}.png`, a 4-frame video.

`red_circle.png` and `blue_square.png` were drawn earlier and are left alone. Reproducible: no randomness.

    python scripts/make_example_media.py [--output-dir examples]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from otter.data.shapes import render  # noqa: E402

SIZE = 224
WHITE = (255, 255, 255)
CENTRE = SIZE / 2
RADIUS = 0.27 * SIZE

IMAGES = {
    "green_triangle": [("triangle", "green", CENTRE, CENTRE, RADIUS)],
    "yellow_circle": [("circle", "yellow", CENTRE, CENTRE, RADIUS)],
    "purple_square": [("square", "purple", CENTRE, CENTRE, RADIUS)],
    "orange_triangle": [("triangle", "orange", CENTRE, CENTRE, RADIUS)],
    # One shape per quadrant, as the dataset's counting images.
    "three_shapes": [
        ("circle", "red", 0.25 * SIZE, 0.25 * SIZE, 0.17 * SIZE),
        ("square", "blue", 0.75 * SIZE, 0.27 * SIZE, 0.17 * SIZE),
        ("triangle", "green", 0.27 * SIZE, 0.75 * SIZE, 0.17 * SIZE),
    ],
}
VIDEO_NAME = "purple_circle_moving_right"
VIDEO_FRAMES = 4


def video_frames() -> list[list[tuple]]:
    """A purple circle crossing from left to right, as `otter.data.shapes` draws its videos."""
    radius = 0.15 * SIZE
    step = (SIZE - 2 * radius - 2) / (VIDEO_FRAMES - 1)
    return [[("circle", "purple", radius + 1 + step * frame, CENTRE, radius)] for frame in range(VIDEO_FRAMES)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "examples")
    args = parser.parse_args(argv)
    images_dir = args.output_dir / "images"
    frames_dir = args.output_dir / "frames" / VIDEO_NAME
    images_dir.mkdir(parents=True, exist_ok=True)
    frames_dir.mkdir(parents=True, exist_ok=True)
    for name, shapes in IMAGES.items():
        render(SIZE, WHITE, shapes).save(images_dir / f"{name}.png", optimize=True)
    for index, shapes in enumerate(video_frames()):
        render(SIZE, WHITE, shapes).save(frames_dir / f"frame_{index}.png", optimize=True)
    print(f"wrote {len(IMAGES)} images to {images_dir} and {VIDEO_FRAMES} frames to {frames_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
