"""Otter on transformers: `OtterConfig`, `OtterForConditionalGeneration`, `OtterProcessor`."""

from .configuration_otter import OtterConfig
from .modeling_otter import OtterForConditionalGeneration, OtterModel, OtterPreTrainedModel

__all__ = ["OtterConfig", "OtterForConditionalGeneration", "OtterModel", "OtterPreTrainedModel"]
