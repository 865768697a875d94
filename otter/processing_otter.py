"""Processor of Otter: Flamingo's processor plus the `<answer>` token and Otter's prompt format,
`<image>User: {question} GPT:<answer>`, with in-context examples `<image>User: {q} GPT:<answer> {a}<|endofchunk|>`."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from transformers.utils import logging

from flamingo.processing_flamingo import FlamingoProcessor

logger = logging.get_logger(__name__)


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    return value.strip()


class OtterProcessor(FlamingoProcessor):
    r"""
    [`FlamingoProcessor`] for Otter: the tokenizer also gets `<answer>` (after `<|endofchunk|>` and `<image>`, then
    `<PAD>` if it has no pad token: the order Otter adds them in), and the processor builds and parses Otter's
    prompts:

    - [`~OtterProcessor.build_prompt`]: one image per turn,
      `<image>User: {q1} GPT:<answer> {a1}<|endofchunk|><image>User: {q} GPT:<answer>`;
    - [`~OtterProcessor.build_video_prompt`]: one `<image>` for the whole clip,
      `<image>User: {q1} GPT:<answer> {a1}<|endofchunk|>User: {q} GPT:<answer>`;
    - [`~OtterProcessor.decode_answer`]: the text after the last `<answer>`, up to `<|endofchunk|>`.
    """

    answer_token = "<answer>"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.answer_token_id: int = self.tokenizer.convert_tokens_to_ids(self.answer_token)

    @classmethod
    def required_special_tokens(cls) -> list[str]:
        return [*super().required_special_tokens(), cls.answer_token]

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {**super().special_token_ids, "answer_token_id": self.answer_token_id}

    # ----- prompts ----------------------------------------------------------------------------------------------

    @classmethod
    def _turn(cls, question: str, answer: str | None = None) -> str:
        turn = f"User: {question} GPT:{cls.answer_token}"
        if answer is not None:
            turn += f" {answer}{cls.endofchunk_token}"
        return turn

    @classmethod
    def _examples(cls, in_context) -> list[tuple[str, str]]:
        if in_context is None:
            return []
        if isinstance(in_context, str) or not isinstance(in_context, Sequence):
            raise ValueError(
                f"in_context: expected a list of (question, answer) pairs, got {type(in_context).__name__}"
            )
        examples = []
        for index, example in enumerate(in_context):
            if isinstance(example, str) or not isinstance(example, Sequence) or len(example) != 2:
                raise ValueError(f"in_context[{index}]: expected a (question, answer) pair, got {example!r}")
            examples.append(
                (
                    _check_text(example[0], f"in_context[{index}] question"),
                    _check_text(example[1], f"in_context[{index}] answer"),
                )
            )
        return examples

    @classmethod
    def build_prompt(cls, question: str, in_context: Sequence[tuple[str, str]] | None = None) -> str:
        """Otter's image prompt. Each in-context example comes with its own image, so the prompt has
        `len(in_context) + 1` `<image>` tokens; pass the images in the same order (examples first, query last):

        `<image>User: {q_1} GPT:<answer> {a_1}<|endofchunk|>...<image>User: {question} GPT:<answer>`

        Questions and answers are stripped of surrounding whitespace."""
        question = _check_text(question, "question")
        pieces = [cls.media_token + cls._turn(q, a) for q, a in cls._examples(in_context)]
        pieces.append(cls.media_token + cls._turn(question))
        return "".join(pieces)

    @classmethod
    def build_video_prompt(cls, question: str, in_context: Sequence[tuple[str, str]] | None = None) -> str:
        """Otter's video prompt: one `<image>` token for the whole clip (its frames go along F of `vision_x`),
        then earlier turns about the same clip, then the question:

        `<image>User: {q_1} GPT:<answer> {a_1}<|endofchunk|>...User: {question} GPT:<answer>`"""
        question = _check_text(question, "question")
        turns = [cls._turn(q, a) for q, a in cls._examples(in_context)]
        return cls.media_token + "".join(turns) + cls._turn(question)

    # ----- answers ----------------------------------------------------------------------------------------------

    def decode_answer(self, text_or_ids) -> str | list[str]:
        """The model's answer in a generated sequence: the text after the last `<answer>`, cut at the first
        `<|endofchunk|>` that follows, without special tokens or surrounding whitespace. Text without `<answer>` is
        taken whole.

        Accepts a string, a sequence of token ids (list or 1-d tensor), or a batch of those (list of strings, list
        of id lists, 2-d tensor), and returns a string or a list of strings accordingly."""
        if isinstance(text_or_ids, torch.Tensor | list | tuple) or hasattr(text_or_ids, "tolist"):
            value = text_or_ids.tolist() if hasattr(text_or_ids, "tolist") else list(text_or_ids)
            if isinstance(value, Integral):
                value = [value]
            if not isinstance(value, list):
                raise ValueError(
                    f"decode_answer: expected a string, token ids, or a batch of either, got {type(value).__name__}"
                )
            if value and all(isinstance(entry, str) for entry in value):
                return [self._parse_answer(entry) for entry in value]
            if value and all(isinstance(entry, list | tuple) for entry in value):
                return [self._parse_answer(self.tokenizer.decode([int(i) for i in entry])) for entry in value]
            if all(isinstance(entry, Integral) for entry in value):
                return self._parse_answer(self.tokenizer.decode([int(entry) for entry in value]))
            raise ValueError(
                "decode_answer: expected a string, token ids, or a batch of either, "
                f"got a sequence of {sorted({type(entry).__name__ for entry in value})}"
            )
        if isinstance(text_or_ids, str):
            return self._parse_answer(text_or_ids)
        raise ValueError(
            f"decode_answer: expected a string, token ids, or a batch of either, got {type(text_or_ids).__name__}"
        )

    def _parse_answer(self, text: str) -> str:
        text = text.split(self.answer_token)[-1]
        text = text.split(self.endofchunk_token)[0]
        for token in sorted(self.tokenizer.all_special_tokens, key=len, reverse=True):
            text = text.replace(token, "")
        return text.strip()


__all__ = ["OtterProcessor"]
