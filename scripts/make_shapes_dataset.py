"""Write the synthetic MIMIC-IT "shapes" dataset (see `otter/data/shapes.py`).

    python scripts/make_shapes_dataset.py --output-dir data/shapes --seed 0

Then train on `data/shapes/shapes_train.yaml` and evaluate on `data/shapes/shapes_val.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otter.data.shapes import make_shapes_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32, help="pixels (the tiny configs use 32)")
    parser.add_argument("--num-image", type=int, default=240, help="single-image questions in the train split")
    parser.add_argument("--num-in-context", type=int, default=90, help="in-context queries in the train split")
    parser.add_argument("--num-videos", type=int, default=60, help="videos in the train split")
    parser.add_argument("--frames", type=int, default=4, help="frames per video")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="held-out size relative to train")
    parser.add_argument("--images-format", choices=("json", "parquet"), default="json")
    args = parser.parse_args(argv)
    paths = make_shapes_dataset(
        args.output_dir,
        seed=args.seed,
        image_size=args.image_size,
        num_image=args.num_image,
        num_in_context=args.num_in_context,
        num_videos=args.num_videos,
        frames=args.frames,
        val_fraction=args.val_fraction,
        images_format=args.images_format,
    )
    files = sorted(p for p in paths.output_dir.iterdir() if p.is_file())
    print(f"wrote {len(files)} files to {paths.output_dir} ({sum(p.stat().st_size for p in files) / 1024:.0f} KiB)")
    print(f"train mixture: {paths.train_yaml}")
    print(f"held-out mixture: {paths.val_yaml}")
    for path in files:
        if path.name.endswith("_instructions.json"):
            count = len(json.loads(path.read_text())["data"])
            print(f"  {path.name}: {count} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
