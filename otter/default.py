"""The embedded default model, `otter-tiny-shapes`: a tiny Otter trained by this project's own pipeline
(`scripts/build_default_model.py`) on the synthetic shapes dataset, shipped inside the package so that the
`otter` command, the notebook and `make run` work offline with no download.

    model, processor = otter.load_default()
    model = AutoModelForImageTextToText.from_pretrained(otter.default_model_path())

It answers the shapes questions (the colour or the shape of a shape, how many shapes there are, which way a shape
moves in a video, with or without in-context examples); its model card (`README.md` in the model directory) says
how it was made and how well it scores on held-out questions. It knows nothing else.
"""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_MODEL_NAME = "otter-tiny-shapes"
_DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
# What a usable model directory holds (the tokenizer's files vary by kind, so only its config is checked).
_REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json")


def default_model_path() -> Path:
    """The directory of the embedded default model (package data: `otter/default_model/`). Raises
    `FileNotFoundError` when the installation lacks it (rebuild it with `python scripts/build_default_model.py`)."""
    missing = [name for name in _REQUIRED_FILES if not (_DEFAULT_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the embedded default model is missing from this installation ({_DEFAULT_MODEL_DIR}: no "
            f"{', '.join(missing)}); rebuild it with `python scripts/build_default_model.py` or pass a model path"
        )
    return _DEFAULT_MODEL_DIR


def model_display_name(name_or_path: str | Path) -> str:
    """A short name for a model path: `otter-tiny-shapes` for the embedded model, else the last path component."""
    path = Path(str(name_or_path))
    if str(name_or_path) and path.resolve() == _DEFAULT_MODEL_DIR:
        return DEFAULT_MODEL_NAME
    return path.name


def load_processor(path: str | Path, config=None):
    """The processor of an HF model directory or Hub id. Directories this library writes carry one
    (`processor_config.json`). The published 2023 releases ship only a tokenizer: for them an `OtterProcessor` /
    `FlamingoProcessor` is built from that tokenizer and a CLIP image processor at the vision tower's image size
    (OpenAI CLIP mean/std, as Otter's own inference code uses). Raises `ValueError` when the tokenizer's special
    token ids disagree with the config's, since the model would then read the wrong rows."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, CLIPImageProcessorPil

    from flamingo import FlamingoProcessor

    from .processing_otter import OtterProcessor

    config = config if config is not None else AutoConfig.from_pretrained(str(path))
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except OSError as error:  # no processor or image-processor config: a tokenizer-only release
        logger.info(f"{path} has no processor config ({str(error).splitlines()[0]}); building one from its tokenizer")
        processor = None
    if not isinstance(processor, FlamingoProcessor):
        size = config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor_class = OtterProcessor if config.model_type == "otter" else FlamingoProcessor
        processor = processor_class(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(str(path)))
    expected = {name: getattr(config, name, None) for name in processor.special_token_ids}
    if processor.special_token_ids != expected:
        raise ValueError(
            f"{path}: the tokenizer's special token ids {processor.special_token_ids} differ from the config's "
            f"{expected}; fix the tokenizer or the config so that they agree"
        )
    return processor


def load_pretrained(path: str | Path, device: str | None = None, dtype=None):
    """(model, processor) from an HF model directory or Hub id, through the Auto classes; the model is in eval
    mode, on `device` (default: CPU). Tokenizer-only releases get a processor built for them (`load_processor`)."""
    from transformers import AutoModelForImageTextToText

    import flamingo  # noqa: F401  (registers the Flamingo classes with the Auto factories)

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
    processor = load_processor(path, model.config)
    if device is not None:
        model = model.to(device)
    logger.info(f"loaded {type(model).__name__} from {path} ({sum(p.numel() for p in model.parameters()):,} params)")
    return model.eval(), processor


def load_default(device: str | None = None, dtype=None):
    """The embedded default model and its processor: `(OtterForConditionalGeneration, OtterProcessor)`, the model
    in eval mode on `device` (default: CPU)."""
    return load_pretrained(default_model_path(), device=device, dtype=dtype)


__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_model_path",
    "load_default",
    "load_pretrained",
    "load_processor",
    "model_display_name",
]
