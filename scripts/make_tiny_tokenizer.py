"""Write the tiny BPE tokenizer used by the tests and the tiny configs to ``tests/fixtures/tiny-tokenizer``.

Its special-token ids match ``configs/*-tiny.json``: ``<PAD>`` 0, ``<s>`` 1, ``</s>`` 2, ``<|endofchunk|>`` 3,
``<image>`` 4, ``<answer>`` 5, ``<unk>`` 6. The vocabulary (128 entries) is trained on a fixed corpus, so the
output is byte-for-byte reproducible: ``python scripts/make_tiny_tokenizer.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<PAD>", "<s>", "</s>", "<|endofchunk|>", "<image>", "<answer>", "<unk>"]
VOCAB_SIZE = 128
CORPUS = [
    "User: What is in the image? GPT: A red circle on a white background.",
    "User: What colour is the shape? GPT: The shape is blue.",
    "User: Describe the video. GPT: A green square moves to the left.",
    "An image of two cats. A photo of a dog playing with a ball.",
    "Question: how many objects are there? Answer: three triangles and one star.",
    "yellow purple orange black gray pink brown circle square triangle star cross",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? : ; ' \" - ( )",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<PAD>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|endofchunk|>", "<image>", "<answer>"],
        padding_side="left",
    )
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path(__file__).parents[1] / "tests/fixtures/tiny-tokenizer")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)), strict=True):
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != expected:
            raise RuntimeError(f"special token {token!r} got id {actual}, expected {expected}")
    if len(tokenizer) > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} entries, more than the tiny vocab of {VOCAB_SIZE}")
    tokenizer.save_pretrained(args.output)


if __name__ == "__main__":
    main()
