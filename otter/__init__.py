"""Otter on transformers: `OtterConfig`, `OtterForConditionalGeneration`, `OtterProcessor`.

Importing the package registers them with `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor`, so
saved checkpoints load through the Auto classes without `trust_remote_code`."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .configuration_otter import OtterConfig
from .default import default_model_path, load_default, load_processor
from .modeling_otter import OtterForConditionalGeneration, OtterModel, OtterPreTrainedModel
from .processing_otter import OtterProcessor

# exist_ok=True: registering again (a second import, importlib.reload) replaces our own entry instead of failing.
AutoConfig.register(OtterConfig.model_type, OtterConfig, exist_ok=True)
AutoModelForImageTextToText.register(OtterConfig, OtterForConditionalGeneration, exist_ok=True)
AutoProcessor.register(OtterConfig, OtterProcessor, exist_ok=True)

__all__ = [
    "OtterConfig",
    "OtterForConditionalGeneration",
    "OtterModel",
    "OtterPreTrainedModel",
    "OtterProcessor",
    "default_model_path",
    "load_default",
    "load_processor",
]
