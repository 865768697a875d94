import json

import pytest
from conftest import CONFIGS, tiny_config

from flamingo import FlamingoConfig
from otter import OtterConfig


@pytest.mark.parametrize(("name", "config_class"), [("otter-9b", OtterConfig), ("openflamingo-9b", FlamingoConfig)])
def test_published_configs_load_unchanged(name, config_class):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    config = config_class.from_json_file(str(CONFIGS / f"{name}.json"))
    assert config.text_config.model_type == "llama"
    assert config.text_config.num_hidden_layers == 32
    assert config.vision_config.hidden_size == config.media_dim == 1024
    assert config.cross_attn_every_n_layers == raw["cross_attn_every_n_layers"] == 4
    assert config.cross_attn_layer_indices() == list(range(3, 32, 4))
    assert config.only_attend_previous == raw["only_attend_previous"]


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_dict_and_disk_round_trip(family, tmp_path):
    config = tiny_config(family, max_num_frames=3)
    again = type(config).from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = type(config).from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.max_num_frames == 3
    assert loaded.text_config.hidden_size == 32


def test_otter_defaults_differ_from_flamingo_only_where_expected():
    otter, flamingo = OtterConfig(), FlamingoConfig()
    assert otter.answer_token_id == 32002
    assert otter.train_lm_head and not flamingo.train_lm_head
    assert (otter.media_token_id, otter.endofchunk_token_id) == (flamingo.media_token_id, flamingo.endofchunk_token_id)


def _tiny_dict(**overrides):
    raw = json.loads((CONFIGS / "flamingo-tiny.json").read_text())
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("value", [0, 5, -1])
def test_cross_attn_every_n_layers_out_of_range(value):
    with pytest.raises(ValueError, match="cross_attn_every_n_layers") as error:
        FlamingoConfig.from_dict(_tiny_dict(cross_attn_every_n_layers=value))
    assert str(value) in str(error.value)


@pytest.mark.parametrize("model_type", ["not_a_model", "clip_vision_model"])
def test_unknown_or_non_decoder_text_model_type(model_type):
    raw = _tiny_dict()
    raw["text_config"] = {**raw["text_config"], "model_type": model_type}
    with pytest.raises(ValueError, match="text_config.model_type") as error:
        FlamingoConfig.from_dict(raw)
    assert model_type in str(error.value)


def test_perceiver_dim_must_match_vision_hidden_size():
    with pytest.raises(ValueError, match=r"perceiver_dim.*vision_config.hidden_size=16.*got 1024"):
        FlamingoConfig.from_dict(_tiny_dict(perceiver_dim=1024))
    assert FlamingoConfig.from_dict(_tiny_dict(perceiver_dim=16)).media_dim == 16


@pytest.mark.parametrize("field", ["perceiver_depth", "cross_attn_heads", "perceiver_num_latents"])
def test_sizes_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        FlamingoConfig.from_dict(_tiny_dict(**{field: 0}))


def test_other_decoder_families_are_accepted():
    raw = _tiny_dict()
    raw["text_config"] = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64}
    config = FlamingoConfig.from_dict(raw)
    assert config.text_config.model_type == "qwen2"
    assert config.cross_attn_layer_indices() == [1]
