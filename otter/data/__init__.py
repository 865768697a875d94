"""MIMIC-IT data for Otter training: readers (instruction JSON, lazily indexed images JSON/parquet, train-config
JSON, YAML mixtures), sample builders per task type, label masking, the collator and the resumable sampler."""

from .collator import NON_MODEL_KEYS, OtterDataCollator
from .dataset import MimicitDataset, SampleSpec, resample_frames
from .errors import BadRecords, DataError
from .images import (
    FLAMINGO_MEAN,
    FLAMINGO_STD,
    ImageStore,
    ImageTransform,
    JsonImageStore,
    ParquetImageStore,
    decode_base64,
    decode_image,
    index_json_object,
    open_image_store,
)
from .mimicit import (
    GROUP_TASK_TYPES,
    InstructionRecord,
    MimicitSource,
    TaskType,
    load_instructions,
    load_mixture_yaml,
    load_train_config,
    parse_instruction_record,
)
from .sampler import MixtureBatchSampler
from .samples import (
    IGNORE_INDEX,
    SpecialTokens,
    build_labels,
    format_chunk,
    format_prompt,
    mask_labels,
)

__all__ = [
    "FLAMINGO_MEAN",
    "FLAMINGO_STD",
    "GROUP_TASK_TYPES",
    "IGNORE_INDEX",
    "NON_MODEL_KEYS",
    "BadRecords",
    "DataError",
    "ImageStore",
    "ImageTransform",
    "InstructionRecord",
    "JsonImageStore",
    "MimicitDataset",
    "MimicitSource",
    "MixtureBatchSampler",
    "OtterDataCollator",
    "ParquetImageStore",
    "SampleSpec",
    "SpecialTokens",
    "TaskType",
    "build_labels",
    "decode_base64",
    "decode_image",
    "format_chunk",
    "format_prompt",
    "index_json_object",
    "load_instructions",
    "load_mixture_yaml",
    "load_train_config",
    "mask_labels",
    "open_image_store",
    "parse_instruction_record",
    "resample_frames",
]
