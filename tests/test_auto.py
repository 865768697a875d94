"""Auto classes: a saved tiny Flamingo / Otter (model + processor) reloads through AutoConfig,
AutoModelForImageTextToText and AutoProcessor without trust_remote_code, and computes the same logits."""

import importlib
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING  # noqa: E402
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING  # noqa: E402

import flamingo  # noqa: E402
import otter  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "tiny-tokenizer"

FAMILIES = {
    "flamingo": ("FlamingoConfig", "FlamingoForConditionalGeneration", "FlamingoProcessor"),
    "otter": ("OtterConfig", "OtterForConditionalGeneration", "OtterProcessor"),
}


def classes(family: str):
    package = otter if family == "otter" else flamingo
    return tuple(getattr(package, name) for name in FAMILIES[family])


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8))


def tiny_model_and_processor(family: str):
    config_class, model_class, processor_class = classes(family)
    torch.manual_seed(0)
    config = config_class.from_json_file(str(REPO_ROOT / "configs" / f"{family}-tiny.json"))
    model = model_class(config).eval()
    with torch.no_grad():  # open the tanh gates so that the images change the logits
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(1.0)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = processor_class(image_processor, AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)))
    return model, processor


def inputs_for(processor):
    if isinstance(processor, otter.OtterProcessor):
        first = processor.build_prompt("What is in the image?", in_context=[("What colour?", "Red.")])
        second = processor.build_prompt("Describe it.")
    else:
        first, second = "<image>An image of a cat.<|endofchunk|><image>An image of", "<image>A dog"
    return processor(text=[first, second], images=[[image(0), image(1)], [image(2)]])


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_save_and_reload_through_auto_classes(tmp_path, family):
    config_class, model_class, processor_class = classes(family)
    model, processor = tiny_model_and_processor(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["model_type"] == family
    assert "auto_map" not in saved_config  # nothing to trust: the classes come from the imported package

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is config_class
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_class
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded_processor) is processor_class
    assert type(reloaded_processor.image_processor) is CLIPImageProcessorPil

    inputs = inputs_for(processor)
    reloaded_inputs = inputs_for(reloaded_processor)
    for key in inputs:
        assert torch.equal(inputs[key], reloaded_inputs[key]), key
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = reloaded(**reloaded_inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    without_images = {key: value for key, value in inputs.items() if key != "vision_x"}
    without_images["input_ids"] = without_images["input_ids"].masked_fill(inputs["input_ids"] == 4, 10)
    with torch.no_grad():  # the images matter, so equal logits above are not a text-only coincidence
        assert not torch.allclose(model(**without_images).logits, expected, atol=1e-3)

    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(reloaded.generate(**reloaded_inputs, max_new_tokens=3, do_sample=False), generated)


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_from_config_and_mappings(family):
    config_class, model_class, processor_class = classes(family)
    assert CONFIG_MAPPING[family] is config_class
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config_class] is model_class
    assert PROCESSOR_MAPPING[config_class] is processor_class
    fields = json.loads((REPO_ROOT / "configs" / f"{family}-tiny.json").read_text())
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    assert type(config) is config_class
    assert type(AutoModelForImageTextToText.from_config(config)) is model_class


def test_registration_is_idempotent(tmp_path):
    model, processor = tiny_model_and_processor("otter")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for _ in range(2):
        importlib.reload(flamingo)
        importlib.reload(otter)
    importlib.import_module("flamingo")
    importlib.import_module("otter")
    assert CONFIG_MAPPING["flamingo"] is flamingo.FlamingoConfig
    assert CONFIG_MAPPING["otter"] is otter.OtterConfig
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is otter.OtterForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(tmp_path)) is otter.OtterProcessor
