"""OpenFlamingo on transformers: `FlamingoConfig`, `FlamingoForConditionalGeneration`, `FlamingoProcessor`."""

from .configuration_flamingo import FlamingoConfig
from .modeling_flamingo import (
    FlamingoForConditionalGeneration,
    FlamingoModel,
    FlamingoPreTrainedModel,
    MediaCache,
    compute_media_positions,
)

__all__ = [
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoModel",
    "FlamingoPreTrainedModel",
    "MediaCache",
    "compute_media_positions",
]
