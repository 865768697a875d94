"""`make run`: build a small Otter from `configs/otter-tiny.json` (random weights), ask it about a bundled image,
and print the answer. Random weights answer gibberish: this shows the whole path (processor -> vision tower ->
perceiver -> cross-attention -> cached generate -> answer decoding) working offline in seconds. A trained
default model replaces it once the project ships one.

    python scripts/run_small_model.py [--image examples/images/red_circle.png] [--question "..."]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer, CLIPImageProcessorPil  # noqa: E402

from otter import OtterConfig, OtterForConditionalGeneration, OtterProcessor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "otter-tiny.json")
    parser.add_argument("--tokenizer", type=Path, default=REPO_ROOT / "tests" / "fixtures" / "tiny-tokenizer")
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "examples" / "images" / "red_circle.png")
    parser.add_argument("--question", default="What colour is the shape?")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    config = OtterConfig.from_json_file(str(args.config))
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = OtterProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(args.tokenizer))
    torch.manual_seed(0)
    model = OtterForConditionalGeneration(config).eval()
    processor.resize_model_embeddings(model)

    prompt = processor.build_prompt(args.question)
    inputs = processor(text=prompt, images=[Image.open(args.image).convert("RGB")], return_tensors="pt")
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=1)
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {args.config.name} ({parameters / 1e6:.2f}M parameters, random weights)")
    print(f"image: {args.image.name}, vision_x {tuple(inputs['vision_x'].shape)}")
    print(f"prompt: {prompt}")
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    print(f"generated: {processor.tokenizer.decode(new_tokens)!r} ({len(new_tokens)} tokens, {seconds:.2f}s)")
    print(f"answer: {processor.decode_answer(output[0])!r}")


if __name__ == "__main__":
    main()
