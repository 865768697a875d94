"""Otter: Flamingo instruction-tuned on MIMIC-IT. Only the config differs (the `<answer>` token, a trainable
`lm_head`, attend-previous semantics); the architecture and the key layout are Flamingo's."""

from flamingo.modeling_flamingo import FlamingoForConditionalGeneration, FlamingoPreTrainedModel

from .configuration_otter import OtterConfig


class OtterPreTrainedModel(FlamingoPreTrainedModel):
    config: OtterConfig
    config_class = OtterConfig
    base_model_prefix = "otter"


class OtterForConditionalGeneration(OtterPreTrainedModel, FlamingoForConditionalGeneration):
    """Otter. Prompts look like `<image>User: {question} GPT:<answer>`; answers end with `<|endofchunk|>`."""

    def _attend_previous(self) -> bool:
        # Otter always trained with `only_attend_previous` (v0.2 reads the config; later versions force the
        # augmentation off), although the published configs carry `use_media_placement_augmentation: true`.
        return self.config.only_attend_previous


OtterModel = OtterForConditionalGeneration

__all__ = ["OtterForConditionalGeneration", "OtterModel", "OtterPreTrainedModel"]
