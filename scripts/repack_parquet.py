"""Rewrite a MIMIC-IT parquet images file with small row groups, so `ParquetImageStore` reads one small row group
per image instead of streaming a huge one (pandas/pyarrow write up to 1M rows per row group by default).

    python scripts/repack_parquet.py LA.parquet LA_repacked.parquet --row-group-size 64
    python scripts/repack_parquet.py LA.parquet LA.parquet   # in place

The file is streamed in bounded memory and written to a temporary file next to the output, renamed over it only
when complete. Schema, column order and pandas metadata (the id index) are kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from otter.data.images import repack_parquet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="parquet images file")
    parser.add_argument("output", type=Path, help="where to write it (may be the input)")
    parser.add_argument("--row-group-size", type=int, default=64, help="rows (images) per row group (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    total = pq.ParquetFile(args.input).metadata.num_rows
    with tqdm(total=total, unit="img", desc=args.input.name, disable=args.no_progress) as bar:
        repack_parquet(args.input, args.output, row_group_size=args.row_group_size, progress=bar.update)


if __name__ == "__main__":
    main()
