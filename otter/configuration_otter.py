"""Otter = Flamingo instruction-tuned on MIMIC-IT: adds the `<answer>` token and attend-previous semantics."""

from flamingo.configuration_flamingo import FlamingoConfig


class OtterConfig(FlamingoConfig):
    r"""
    Configuration for [`OtterForConditionalGeneration`]. Same fields as [`FlamingoConfig`], plus
    `answer_token_id` (`<answer>`, 32002 in the published releases). Otter trains its `lm_head`, so
    `train_lm_head` defaults to `True`.
    """

    model_type = "otter"

    answer_token_id: int | None = 32002
    only_attend_previous: bool = True
    train_lm_head: bool = True


__all__ = ["OtterConfig"]
