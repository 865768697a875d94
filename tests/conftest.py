"""Shared builders for tiny random models. Nothing here touches the network."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from flamingo import FlamingoConfig, FlamingoForConditionalGeneration  # noqa: E402
from otter import OtterConfig, OtterForConditionalGeneration  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
TINY_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "tiny-tokenizer"
MEDIA = 4  # <image> id in the tiny configs
EOC = 3  # <|endofchunk|> id in the tiny configs


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning makes them up to
    10x slower. A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate_as_reference(model, inputs: dict, settings: dict) -> torch.Tensor:
    """Greedy generation with the settings a reference fixture's `meta.json` recorded (`settings` = its "generate")."""
    with torch.no_grad():
        return model.generate(
            vision_x=inputs["vision_x"],
            lang_x=inputs["lang_x"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=settings["max_new_tokens"],
            num_beams=settings["num_beams"],
            do_sample=settings["do_sample"],
            eos_token_id=settings["eos_token_id"],
            pad_token_id=settings["pad_token_id"],
        )


def tiny_config(family: str = "flamingo", **overrides) -> FlamingoConfig:
    """The tiny shapes of `configs/{family}-tiny.json`, with top-level fields overridden."""
    config_class = OtterConfig if family == "otter" else FlamingoConfig
    config = config_class.from_json_file(str(CONFIGS / f"{family}-tiny.json"))
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def make_images_matter(model: FlamingoForConditionalGeneration, gate: float = 1.0) -> FlamingoForConditionalGeneration:
    """Open every tanh gate (they start at 0 = identity) and re-draw the vision, perceiver and cross-attention
    weights at unit scale (std 1/sqrt(fan_in)). With transformers' std of 0.02 a tiny random model's perceiver
    output is dominated by its latents and barely depends on the image; trained models are not like that."""
    with torch.no_grad():
        for name, module in model.named_modules():
            trained_for_images = name.startswith(("vision_encoder", "perceiver")) or "gated_cross_attn_layer" in name
            if trained_for_images and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5)
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(gate)
    return model


def tiny_model(family: str = "flamingo", seed: int = 0, gates: float | None = 1.0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model_class = OtterForConditionalGeneration if family == "otter" else FlamingoForConditionalGeneration
    model = model_class(config).eval()
    if gates is not None:
        make_images_matter(model, gates)
    return model


def random_images(batch: int, num_images: int, frames: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_images, frames, 3, size, size, generator=generator)


def prompt(*pieces, seed: int = 0) -> list[int]:
    """Token ids from pieces: "img" -> <image>, "eoc" -> <|endofchunk|>, an int n -> n random text ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1]  # <s>
    for piece in pieces:
        if piece == "img":
            ids.append(MEDIA)
        elif piece == "eoc":
            ids.append(EOC)
        else:
            ids.extend(torch.randint(10, 128, (piece,), generator=generator).tolist())
    return ids


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


@pytest.fixture
def flamingo_tiny():
    return tiny_model("flamingo")


@pytest.fixture
def otter_tiny():
    return tiny_model("otter")
