"""`from_pretrained` of folders shaped like the published Otter / OpenFlamingo HF releases, at tiny hidden sizes but
with the real vocabulary sizes (32000 to 32004), both config generations, and the leftovers old checkpoints carry.

- June 2023 (`luodian/otter-9b-hf`, `luodian/openflamingo-9b-hf`): the shipped config.json of `configs/*-9b.json`
  (a `text_config` of only `_name_or_path` / `model_type`), or the fully serialised one a transformers-4.30
  `save_pretrained` wrote (every legacy `PretrainedConfig` field, `architectures: ["OtterModel"]`).
- 2024 (otter-ai at HEAD): a `text_config` with `architectures: ["LlamaForCausalLM"]`, and top-level
  `max_num_frames`, `special_tokens` and `lora_config` kwargs. The reference doc names these kwargs without their
  values; `lora_config` has the shape otter-ai's `converting_otter_to_lora.py` writes (`{"r", "lora_alpha",
  "lora_dropout"}`); no otter-ai source read here reads `special_tokens`, so it is tested as an opaque value (list
  or dict) that must survive loading and saving.
- Leftovers: `rotary_emb.inv_freq` buffers (persistent in transformers 4.28) and OpenFlamingo's duplicated
  `lang_encoder.gated_cross_attn_layers.*` aliases are dropped, with a debug log naming them.
- A checkpoint without `perceiver.frame_embs` while the config asks for frames: zeros, and a warning that says so.
"""

import json
import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import CONFIGS, make_images_matter, random_images  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from flamingo import FlamingoForConditionalGeneration  # noqa: E402
from otter import OtterForConditionalGeneration  # noqa: E402

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4}
TINY_VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
}
# What a transformers 4.30 save_pretrained wrote into every sub-config (June 2023 trained checkpoints).
LEGACY_PRETRAINED_CONFIG_FIELDS = {
    "add_cross_attention": False,
    "architectures": None,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False,
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "prefix": None,
    "problem_type": None,
    "pruned_heads": {},
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "suppress_tokens": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tf_legacy_loss": False,
    "tie_encoder_decoder": False,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torch_dtype": None,
    "torchscript": False,
    "transformers_version": "4.30.1",
    "typical_p": 1.0,
    "use_bfloat16": False,
}
LORA_CONFIG = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
MODEL_CLASSES = {"otter": OtterForConditionalGeneration, "flamingo": FlamingoForConditionalGeneration}


def published_config(family: str, generation: str, vocab_size: int, **top_level) -> dict:
    """config.json of a published release, with tiny hidden sizes and the given vocabulary size."""
    name = "otter-9b" if family == "otter" else "openflamingo-9b"
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    config["text_config"].update(TINY_TEXT, vocab_size=vocab_size)
    config["vision_config"].update(TINY_VISION)
    if generation == "2023-saved":  # what save_pretrained under transformers 4.30 wrote
        config.update(_commit_hash=None, architectures=["OtterModel" if family == "otter" else "FlamingoModel"])
        config.update(_name_or_path="/mnt/checkpoints/otter9B_LA_incontext", transformers_version=None)
        for sub in ("text_config", "vision_config"):
            config[sub] = {**LEGACY_PRETRAINED_CONFIG_FIELDS, **config[sub]}
        config["text_config"].update(bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu")
        config["text_config"].update(rms_norm_eps=1e-6, use_cache=True, tie_word_embeddings=False)
        config["vision_config"].update(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512)
    elif generation == "2024":  # otter-ai at HEAD (vicuna-7B / MPT-7B Otter configs)
        config["text_config"].update(
            _name_or_path="/mnt/weights/vicuna-7b-v1.5",
            architectures=["LlamaForCausalLM"],
            torch_dtype="float16",
            transformers_version="4.28.1",
            use_cache=False,
        )
        config.update(_commit_hash=None, transformers_version=None, use_media_placement_augmentation=False)
        config.update(max_num_frames=4, special_tokens=["<|endofchunk|>", "<image>", "<answer>"])
        config.update(lora_config=dict(LORA_CONFIG))
    config.update(top_level)
    return config


def source_model(family: str, config: dict, seed: int = 0):
    """A model built from `config` with weights that make images, frames and every block matter."""
    torch.manual_seed(seed)
    model_class = MODEL_CLASSES[family]
    model = model_class(model_class.config_class.from_dict(json.loads(json.dumps(config))))
    make_images_matter(model, gate=0.5)
    with torch.no_grad():
        if model.perceiver.frame_embs is not None:
            model.perceiver.frame_embs.normal_()
    return model.eval()


def published_state_dict(model, *, legacy: bool = True, drop: tuple[str, ...] = ()) -> dict:
    """The model's weights under the published keys, plus the leftovers of old releases: a `rotary_emb.inv_freq`
    buffer per decoder layer and OpenFlamingo's `lang_encoder.gated_cross_attn_layers.{i}` aliases."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    if legacy:
        text = model.config.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        for i in range(text.num_hidden_layers):
            state[f"lang_encoder.model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = 1.0 / (
                10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
            )
        for key in [k for k in state if ".gated_cross_attn_layer." in k]:
            index, rest = key.split(".model.layers.")[1].split(".gated_cross_attn_layer.")
            state[f"lang_encoder.gated_cross_attn_layers.{index}.{rest}"] = state[key].clone()
    return state


def write_release(folder, config: dict, state: dict, file_format: str = "safetensors", shards: int = 2):
    """A release folder: config.json as published, the weights in `shards` shards with an index (the 9B releases
    have 4), as safetensors or as the 2023 `pytorch_model-0000x-of-0000n.bin` files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(state)
    weight_map = {}
    for shard in range(shards):
        part = {k: state[k] for k in keys[shard::shards]}
        if file_format == "bin":
            name = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, folder / name)
        else:
            name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = "pytorch_model.bin.index.json" if file_format == "bin" else "model.safetensors.index.json"
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}))
    return folder


def prompt_ids(config, vocab_size: int) -> torch.Tensor:
    """Two prompts with the config's <image> / <|endofchunk|> ids where the vocabulary has them, and text ids near
    the top of the vocabulary (the rows a small vocabulary would not have)."""
    media, eoc = config.media_token_id, config.endofchunk_token_id
    text = [[29871, 450, 31999], [1724, 338, 29973]]
    if media < vocab_size and eoc < vocab_size:
        return torch.tensor([[1, media, *text[0], eoc, media, 22], [1, 319, media, *text[1], eoc, media]])
    return torch.tensor([[1, *text[0], 22, 13, 14], [1, 319, *text[1], 2, 3]])


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, vision_x=random_images(2, 2, frames=1, seed=5)).logits


CASES = [
    # family, config generation, vocabulary size, weight format
    ("flamingo", "2023", 32000, "safetensors"),  # the LLaMA vocabulary, before any token is added
    ("flamingo", "2023", 32003, "bin"),  # OpenFlamingo: <|endofchunk|>, <image>, <PAD> added
    ("otter", "2023", 32004, "bin"),  # Otter: + <answer>
    ("otter", "2023-saved", 32004, "safetensors"),
    ("otter", "2024", 32000, "safetensors"),  # otter-ai at HEAD does not resize
    ("otter", "2024", 32001, "safetensors"),
    ("otter", "2024", 32002, "bin"),
    ("flamingo", "2024", 32003, "safetensors"),
]


@pytest.mark.parametrize(("family", "generation", "vocab_size", "file_format"), CASES)
def test_published_release_loads(family, generation, vocab_size, file_format, tmp_path, caplog):
    config = published_config(family, generation, vocab_size)
    source = source_model(family, config)
    folder = write_release(tmp_path / "release", config, published_state_dict(source), file_format)

    with caplog.at_level(logging.DEBUG, logger="flamingo"):
        model, info = MODEL_CLASSES[family].from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.text_config.vocab_size == vocab_size
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == vocab_size
    ids = prompt_ids(model.config, vocab_size)
    torch.testing.assert_close(logits_of(model.eval(), ids), logits_of(source, ids), atol=1e-5, rtol=0)

    # The legacy keys were dropped, each named in a debug record.
    debug = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "lang_encoder.model.layers.3.decoder_layer.self_attn.rotary_emb.inv_freq" in debug
    assert "lang_encoder.gated_cross_attn_layers.3.attn_gate" in debug
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("frame_embs" in w for w in warnings)


@pytest.mark.parametrize("special_tokens", [["<|endofchunk|>", "<image>", "<answer>"], {"media_token": "<image>"}])
def test_2024_kwargs_survive_loading_and_saving(special_tokens, tmp_path, caplog):
    config = published_config("otter", "2024", 32004, special_tokens=special_tokens)
    folder = write_release(tmp_path / "release", config, published_state_dict(source_model("otter", config)))
    with caplog.at_level(logging.WARNING, logger="flamingo"):
        model = OtterForConditionalGeneration.from_pretrained(folder)
    assert model.config.max_num_frames == 4 and model.perceiver.frame_embs.shape == (4, TINY_VISION["hidden_size"])
    assert model.config.special_tokens == special_tokens
    assert model.config.lora_config == LORA_CONFIG
    # LoRA: the config is kept, nothing pretends to apply adapters, and the user is told so.
    assert not any("lora" in name for name, _ in model.named_parameters())
    lora_warnings = [r.getMessage() for r in caplog.records if "lora_config" in r.getMessage()]
    assert len(lora_warnings) == 1 and "not applied" in lora_warnings[0] and "merge" in lora_warnings[0].lower()

    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["max_num_frames"] == 4 and saved["special_tokens"] == special_tokens
    assert saved["lora_config"] == LORA_CONFIG


def test_no_lora_warning_without_lora_config(tmp_path, caplog):
    config = published_config("otter", "2023", 32004)
    folder = write_release(tmp_path / "release", config, published_state_dict(source_model("otter", config)))
    with caplog.at_level(logging.WARNING, logger="flamingo"):
        OtterForConditionalGeneration.from_pretrained(folder)
    assert "lora" not in caplog.text.lower()


def test_missing_frame_embeddings_are_zeros_with_a_warning(tmp_path, caplog):
    """A checkpoint converted before June 2023 has no `perceiver.frame_embs`; a config that asks for frames then gets
    zeros (no frame information, deterministic), never random values, and a warning that says so."""
    config = published_config("otter", "2024", 32004, lora_config=None)
    del config["lora_config"]
    source = source_model("otter", config)
    folder = write_release(
        tmp_path / "release", config, published_state_dict(source, drop=("perceiver.frame_embs",)), "bin"
    )
    loaded = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flamingo"):
            model, info = OtterForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        assert info["missing_keys"] == {"perceiver.frame_embs"}
        frame_warnings = [r for r in caplog.records if r.name.startswith("flamingo") and "frame_embs" in r.getMessage()]
        assert len(frame_warnings) == 1 and frame_warnings[0].levelno == logging.WARNING
        assert "zeros" in frame_warnings[0].getMessage() and "max_num_frames=4" in frame_warnings[0].getMessage()
        assert torch.count_nonzero(model.perceiver.frame_embs) == 0
        loaded.append(model.eval())

    # Everything else was loaded, not re-initialised: the source with zeroed frame embeddings gives the same logits.
    with torch.no_grad():
        source.perceiver.frame_embs.zero_()
    ids = prompt_ids(source.config, 32004)
    torch.testing.assert_close(logits_of(loaded[0], ids), logits_of(source, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(loaded[1], ids), logits_of(loaded[0], ids), atol=0, rtol=0)


def test_frame_embeddings_without_max_num_frames_are_reported(tmp_path, caplog):
    """The reverse case (a model trained with Otter v0.2, which always built 128 frame embeddings, under a config
    without `max_num_frames`): like otter-ai at HEAD, the model has no frame embeddings, and the tensor is reported
    as unexpected rather than dropped silently."""
    config = published_config("otter", "2023", 32004)
    state = published_state_dict(source_model("otter", config))
    state["perceiver.frame_embs"] = torch.randn(128, TINY_VISION["hidden_size"])
    folder = write_release(tmp_path / "release", config, state)
    model, info = OtterForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert model.perceiver.frame_embs is None
    assert info["unexpected_keys"] == {"perceiver.frame_embs"}
