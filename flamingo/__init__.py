"""OpenFlamingo on transformers: `FlamingoConfig`, `FlamingoForConditionalGeneration`, `FlamingoProcessor`.

Importing the package registers them with `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor`, so
saved checkpoints load through the Auto classes without `trust_remote_code`."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .configuration_flamingo import FlamingoConfig
from .modeling_flamingo import (
    FlamingoForConditionalGeneration,
    FlamingoModel,
    FlamingoPreTrainedModel,
    MediaCache,
    compute_media_positions,
)
from .processing_flamingo import FlamingoProcessor

# exist_ok=True: registering again (a second import, importlib.reload) replaces our own entry instead of failing.
AutoConfig.register(FlamingoConfig.model_type, FlamingoConfig, exist_ok=True)
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FlamingoConfig, FlamingoProcessor, exist_ok=True)

__all__ = [
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoModel",
    "FlamingoPreTrainedModel",
    "FlamingoProcessor",
    "MediaCache",
    "compute_media_positions",
]
