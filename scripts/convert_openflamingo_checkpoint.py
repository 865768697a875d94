"""Convert an OpenFlamingo / Otter checkpoint to a Hugging Face model folder (same as `otter convert`).

    python scripts/convert_openflamingo_checkpoint.py --checkpoint checkpoint.pt --base-lm llama-7b-hf \
        --vision clip-vit-large-patch14 --config configs/openflamingo-9b.json --output openflamingo-9b-hf

Run with --help for every option.
"""

import sys

from otter.convert import main

if __name__ == "__main__":
    sys.exit(main())
