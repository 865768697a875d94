"""The Otter prompt format and its training labels.

One turn ("chunk") is `<image>User: {instruction} GPT:<answer> {answer}<|endofchunk|>` (the `<image>` only where
the turn brings an image). A sample is `<s>` + its chunks + `</s>`.

Labels supervise, in **every** row, the tokens after each `<answer>` up to and including the next
`<|endofchunk|>`, plus the EOS; everything else (the prompt, `<image>`, `<answer>`, position 0, padding) is -100.
(Otter v0.2 applied its prompt masking to the batch's last row only; this is the corrected rule of reference §6.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .mimicit import TaskType

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
ANSWER_TOKEN = "<answer>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"


def format_chunk(instruction: str, answer: str, with_image: bool) -> str:
    """`<image>User: {instruction} GPT:<answer> {answer}<|endofchunk|>` (no `<image>` when `with_image` is False)."""
    image = IMAGE_TOKEN if with_image else ""
    return f"{image}User: {instruction.strip()} GPT:{ANSWER_TOKEN} {answer.strip()}{END_OF_CHUNK_TOKEN}"


def format_prompt(task_type: TaskType, turns: Sequence[tuple[str, str]]) -> str:
    """The text of a sample made of (instruction, answer) turns: in-context tasks put `<image>` before every turn
    (each brings its own image); image and video tasks before the first turn only; text tasks nowhere."""
    task_type = TaskType(task_type)
    chunks = []
    for index, (instruction, answer) in enumerate(turns):
        with_image = task_type == TaskType.IN_CONTEXT or (task_type in (TaskType.IMAGE, TaskType.VIDEO) and index == 0)
        chunks.append(format_chunk(instruction, answer, with_image))
    return "".join(chunks)


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids the data pipeline needs, read from a tokenizer and checked."""

    bos: int
    eos: int
    pad: int
    image: int
    answer: int
    end_of_chunk: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        def token_id(token: str) -> int:
            ids = tokenizer.convert_tokens_to_ids([token])
            value = ids[0] if ids else None
            if value is None or (tokenizer.unk_token_id is not None and value == tokenizer.unk_token_id):
                raise ValueError(
                    f"the tokenizer has no {token!r} token; add it (tokenizer.add_special_tokens) and resize the "
                    "model's embeddings"
                )
            return int(value)

        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a BOS and an EOS token")
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad token; Otter adds <PAD> (tokenizer.add_special_tokens)")
        return cls(
            bos=int(tokenizer.bos_token_id),
            eos=int(tokenizer.eos_token_id),
            pad=int(pad),
            image=token_id(IMAGE_TOKEN),
            answer=token_id(ANSWER_TOKEN),
            end_of_chunk=token_id(END_OF_CHUNK_TOKEN),
        )

    def check_model_config(self, config) -> None:
        """Raise when the model's configured token ids differ from the tokenizer's."""
        pairs = [("media_token_id", self.image), ("endofchunk_token_id", self.end_of_chunk)]
        if getattr(config, "answer_token_id", None) is not None:
            pairs.append(("answer_token_id", self.answer))
        for name, value in pairs:
            configured = getattr(config, name, None)
            if configured is not None and configured != value:
                raise ValueError(f"config.{name} is {configured} but the tokenizer maps that token to {value}")


def build_labels(
    input_ids: Sequence[int],
    answer_token_id: int,
    end_of_chunk_token_id: int,
    eos_token_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> list[int]:
    """Labels for one unpadded row: the tokens after each `<answer>` up to and including the next `<|endofchunk|>`,
    and every EOS, keep their id; all else is `ignore_index`. Position 0 is never a target. An answer cut off by
    truncation is supervised to the end of the row."""
    labels = [ignore_index] * len(input_ids)
    in_answer = False
    for position, token in enumerate(input_ids):
        token = int(token)
        if in_answer:
            labels[position] = token
            if token == end_of_chunk_token_id:
                in_answer = False
        elif token == answer_token_id:
            in_answer = True
        elif token == eos_token_id:
            labels[position] = token
    if labels:
        labels[0] = ignore_index
    return labels


def mask_labels(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    answer_token_id: int,
    end_of_chunk_token_id: int,
    eos_token_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.LongTensor:
    """`build_labels` for every row of a padded (B, L) batch, left or right padded; padding is `ignore_index`."""
    labels = torch.full_like(input_ids, ignore_index)
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool() if attention_mask is not None else torch.ones_like(input_ids[row], dtype=bool)
        positions = keep.nonzero().flatten()
        row_labels = build_labels(
            input_ids[row, positions].tolist(), answer_token_id, end_of_chunk_token_id, eos_token_id, ignore_index
        )
        labels[row, positions] = torch.tensor(row_labels, dtype=labels.dtype)
    return labels
