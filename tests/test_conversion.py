"""flamingo/conversion.py: unit tests of each function, and round trips: a tiny model's tensors are written in each
source layout (OpenFlamingo v1 / v2, DDP training checkpoints, Otter's final_weights.pt, HF base-LM and CLIP
folders), converted back, loaded into a fresh model with strict key checking, and must give the source's logits."""

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import prompt, random_images, tiny_config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPVisionModel, LlamaForCausalLM  # noqa: E402

from flamingo import FlamingoConfig, FlamingoForConditionalGeneration  # noqa: E402
from flamingo.conversion import (  # noqa: E402
    ConversionReport,
    detect_layers_path,
    flamingo_to_otter,
    hf_clip_to_flamingo,
    hf_lm_to_flamingo,
    load_checkpoint,
    open_clip_visual_to_hf_clip,
    pad_vocab_rows,
    rename_openflamingo_v1,
    rename_openflamingo_v2,
    unwrap_training_checkpoint,
)
from otter import OtterConfig, OtterForConditionalGeneration  # noqa: E402

ATOL = 1e-5

# ----- building sources ----------------------------------------------------------------------------------------


def randomized(model, seed: int):
    """Every parameter redrawn (gates 0.5, frame embeddings nonzero), so that a tensor loaded into the wrong place,
    or not at all, changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(0.5)
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (0 if "bias" in name else 1))
    return model.eval()


def make_model(config, seed: int = 0):
    model_class = OtterForConditionalGeneration if isinstance(config, OtterConfig) else FlamingoForConditionalGeneration
    return randomized(model_class(config), seed)


def wide_config() -> FlamingoConfig:
    """12 decoder layers with a cross-attention block before each, and 12 perceiver layers: indices >= 10."""
    config = tiny_config("flamingo", cross_attn_every_n_layers=1, perceiver_depth=12)
    config.text_config.num_hidden_layers = 12
    return config


def mpt_config() -> FlamingoConfig:
    fields = tiny_config("flamingo").to_dict()
    fields["text_config"] = {
        "model_type": "mpt",
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 4,
        "expansion_ratio": 2,
        "vocab_size": 128,
        "max_seq_len": 256,
    }
    return FlamingoConfig(**{k: v for k, v in fields.items() if k not in ("transformers_version", "architectures")})


def inputs():
    ids = torch.tensor([prompt("img", 3, "eoc", "img", 4, seed=1), prompt(2, "img", 4, "eoc", "img", 1, seed=2)])
    return {"lang_x": ids, "vision_x": random_images(2, 2, seed=3)}


def logits(model, **extra):
    with torch.no_grad():
        return model(**inputs(), **extra).logits


def state_dict_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_round_trip(source, converted: dict, config=None):
    """Load `converted` strictly into a fresh (differently initialised) model and compare logits with `source`."""
    target = make_model(config or source.config, seed=99)
    result = target.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(logits(target), logits(source), atol=ATOL, rtol=0)
    return target


# Inverse maps: our layout -> the source layouts (written independently of flamingo/conversion.py).


def openflamingo_key(key: str) -> str:
    key = re.sub(r"^perceiver\.layers\.(\d+)\.feed_forward\.", r"perceiver.layers.\1.1.", key)
    key = re.sub(r"^perceiver\.layers\.(\d+)\.(?!1\.)", r"perceiver.layers.\1.0.", key)
    return key.replace(".gated_cross_attn_layer.feed_forward.", ".gated_cross_attn_layer.ff.")


def to_openflamingo(sd, *, layers="model.layers", trainable_only=False, old_decoder_blocks=False, inv_freq=False):
    """OpenFlamingo's `state_dict()`: perceiver `.0`/`.1`, xattn `ff.`, and the `gated_cross_attn_layers` alias of
    every block (OpenFlamingo v1 and v2), `old_decoder_blocks` aliases (v2), inv_freq buffers (transformers 4.28).
    `trainable_only`: what v1's `get_checkpoint` keeps (perceiver, blocks, input embeddings, buffers)."""
    out = {}
    layer = re.compile(rf"^lang_encoder\.{re.escape(layers)}\.(\d+)\.(gated_cross_attn_layer|decoder_layer)\.(.+)$")
    for key, value in sd.items():
        trainable = key.startswith("perceiver.") or ".gated_cross_attn_layer." in key or "embed_tokens" in key
        if trainable_only and not trainable:
            continue
        new_key = openflamingo_key(key)
        out[new_key] = value
        match = layer.match(new_key)
        if match and match.group(2) == "gated_cross_attn_layer":
            out[f"lang_encoder.gated_cross_attn_layers.{match.group(1)}.{match.group(3)}"] = value
        elif match and old_decoder_blocks:
            out[f"lang_encoder.old_decoder_blocks.{match.group(1)}.{match.group(3)}"] = value
    if inv_freq:
        for i in range(len({m.group(1) for k in sd if (m := layer.match(k))})):
            out[f"lang_encoder.{layers}.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    return out


def to_open_clip(sd, prefix_in="vision_encoder.vision_model.", prefix_out="vision_encoder."):
    """HF CLIP vision keys -> open_clip `VisionTransformer` keys (q, k, v concatenated into in_proj), plus `proj`."""
    out, qkv = {}, {}
    simple = {
        "embeddings.patch_embedding.weight": "conv1.weight",
        "embeddings.class_embedding": "class_embedding",
        "embeddings.position_embedding.weight": "positional_embedding",
    }
    for key, value in sd.items():
        if not key.startswith(prefix_in):
            out[key] = value
            continue
        name = key[len(prefix_in) :]
        if name in simple:
            out[prefix_out + simple[name]] = value
            continue
        attn = re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if attn:
            qkv.setdefault((attn.group(1), attn.group(3)), {})[attn.group(2)] = value
            continue
        for ours, theirs in (
            (r"^pre_layrnorm\.", "ln_pre."),
            (r"^post_layernorm\.", "ln_post."),
            (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
            (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
            (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
            (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
            (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
        ):
            if re.match(ours, name):
                out[prefix_out + re.sub(ours, theirs, name)] = value
                break
        else:
            raise AssertionError(f"unmapped HF CLIP key {key}")
    for (layer, kind), parts in qkv.items():
        out[f"{prefix_out}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    width = out[prefix_out + "class_embedding"].shape[0]
    out[prefix_out + "proj"] = torch.randn(width, 8)
    return out


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """A source Flamingo model and, written with transformers' own save_pretrained, its LM as a plain
    `LlamaForCausalLM` folder and its vision tower as a `CLIPVisionModel` folder (the --base-lm / --vision inputs)."""
    root = tmp_path_factory.mktemp("base")
    source = make_model(tiny_config("flamingo"), seed=1)
    return source, *save_base(source, root)


def save_base(source, root):
    sd = state_dict_of(source)
    lm = LlamaForCausalLM(source.config.text_config)
    lm_keys = {
        re.sub(r"^lang_encoder\.model\.layers\.(\d+)\.decoder_layer\.", r"model.layers.\1.", k).removeprefix(
            "lang_encoder."
        ): v
        for k, v in sd.items()
        if k.startswith("lang_encoder.") and ".gated_cross_attn_layer." not in k
    }
    lm.load_state_dict(lm_keys, strict=True)
    lm.save_pretrained(root / "lm")
    clip = CLIPVisionModel(source.config.vision_config)
    prefix = "vision_encoder.vision_model."
    clip.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    clip.save_pretrained(root / "clip")
    return root / "lm", root / "clip"


def base_weights(lm_dir, clip_dir):
    lm, _ = hf_lm_to_flamingo(load_checkpoint(lm_dir))
    vision, _ = hf_clip_to_flamingo(load_checkpoint(clip_dir))
    return {**lm, **vision}


# ----- unwrap_training_checkpoint / load_checkpoint ------------------------------------------------------------


def test_unwrap_strips_nesting_and_ddp_prefix():
    weight = torch.ones(2)
    assert unwrap_training_checkpoint({"a.weight": weight}) == {"a.weight": weight}
    nested = {"epoch": 3, "model_state_dict": {"module.a.weight": weight, "module.b": weight}, "optimizer": {}}
    assert unwrap_training_checkpoint(nested) == {"a.weight": weight, "b": weight}
    assert unwrap_training_checkpoint({"model": {"state_dict": {"module._orig_mod.x": weight}}}) == {"x": weight}


@pytest.mark.parametrize(
    ("obj", "named"),
    [
        ([torch.ones(1)], "found list"),
        ({"epoch": 1, "optimizer_state_dict": {}}, "'optimizer_state_dict'"),
        ({"model_state_dict": [1, 2]}, "'model_state_dict'"),
        ({"a": torch.ones(1), "step": 7}, "not tensors: ['step']"),
        ({"model_state_dict": {"epoch": 2}}, "after unwrapping 'model_state_dict'"),
    ],
)
def test_unwrap_names_what_it_found(obj, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        unwrap_training_checkpoint(obj)


def test_unwrap_refuses_keys_that_collide_after_stripping():
    with pytest.raises(ValueError, match="two keys become 'a'"):
        unwrap_training_checkpoint({"module.a": torch.ones(1), "a": torch.ones(1)})


def test_load_checkpoint_reads_pt_bin_and_safetensors(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, tmp_path / "ckpt.pt")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    save_file(sd, str(tmp_path / "model.safetensors"))
    for name in ("ckpt.pt", "pytorch_model.bin", "model.safetensors"):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # A folder is read as an HF model folder (model.safetensors first).
    assert load_checkpoint(tmp_path).keys() == sd.keys()


def test_load_checkpoint_reads_sharded_folders(tmp_path):
    shards = {
        "model-00001-of-00002.safetensors": {"a": torch.ones(2)},
        "model-00002-of-00002.safetensors": {"b": torch.zeros(1)},
    }
    for name, part in shards.items():
        save_file(part, str(tmp_path / name))
    weight_map = {key: name for name, part in shards.items() for key in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert sorted(load_checkpoint(tmp_path)) == ["a", "b"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown extension '\.npz'"):
        load_checkpoint(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_checkpoint(tmp_path)
    torch.save({"epoch": 1}, tmp_path / "no_model.pt")
    with pytest.raises(ValueError, match="no_model.pt"):
        load_checkpoint(tmp_path / "no_model.pt")


def write_marker(path):  # what the malicious pickle would run
    with open(path, "w") as handle:
        handle.write("code from a checkpoint ran")


class Malicious:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (write_marker, (self.path,))


def test_unsafe_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model_state_dict": {"a": torch.ones(1)}, "extra": Malicious(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as error:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(error.value)
    assert "unsafe pickle" in message and "never runs code" in message
    assert "safetensors" in message and "re-save" in message
    assert not marker.exists()


# ----- open_clip / HF CLIP -------------------------------------------------------------------------------------


def test_open_clip_visual_to_hf_clip_maps_every_tensor():
    vision = CLIPVisionModel(tiny_config("flamingo").vision_config)
    hf = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    open_clip = to_open_clip(hf, prefix_in="vision_model.", prefix_out="visual.")
    open_clip["text.token_embedding.weight"] = torch.ones(1)  # outside prefix_in: passes through
    converted, report = open_clip_visual_to_hf_clip(open_clip, "visual.", "vision_model.")
    assert report.dropped == ["visual.proj"]
    assert converted.pop("text.token_embedding.weight").shape == (1,)
    assert converted.keys() == hf.keys()
    assert all(torch.equal(converted[k], hf[k]) for k in hf)
    # q/k/v come out as independent tensors (no shared storage: safetensors can save them).
    q = converted["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    k = converted["vision_model.encoder.layers.0.self_attn.k_proj.weight"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()


def test_open_clip_visual_to_hf_clip_refuses_unknown_keys():
    sd = {"conv1.weight": torch.ones(4, 3, 2, 2), "transformer.resblocks.0.ls_1.gamma": torch.ones(4)}
    with pytest.raises(ValueError, match=r"ls_1\.gamma"):
        open_clip_visual_to_hf_clip(sd)
    with pytest.raises(ValueError, match="divisible by 3"):
        open_clip_visual_to_hf_clip({"transformer.resblocks.0.attn.in_proj_weight": torch.ones(4, 4)})


def test_hf_clip_to_flamingo_accepts_saved_flattened_and_full_clip_keys():
    saved = {
        "vision_model.embeddings.class_embedding": torch.ones(2),
        "vision_model.post_layernorm.bias": torch.ones(2),
    }
    flattened = {"embeddings.class_embedding": torch.ones(2), "post_layernorm.bias": torch.ones(2)}
    expected = {
        "vision_encoder.vision_model.embeddings.class_embedding",
        "vision_encoder.vision_model.post_layernorm.bias",
    }
    assert hf_clip_to_flamingo(saved)[0].keys() == expected
    assert hf_clip_to_flamingo(flattened)[0].keys() == expected
    full_clip = {
        **saved,
        "text_model.embeddings.token_embedding.weight": torch.ones(1),
        "visual_projection.weight": torch.ones(1),
        "text_projection.weight": torch.ones(1),
        "logit_scale": torch.ones(()),
        "vision_model.embeddings.position_ids": torch.arange(3),
    }
    converted, report = hf_clip_to_flamingo(full_clip)
    assert converted.keys() == expected and len(report.dropped) == 5
    with pytest.raises(ValueError, match="model.layers.0"):
        hf_clip_to_flamingo({**saved, "model.layers.0.weight": torch.ones(1)})


# ----- language models -----------------------------------------------------------------------------------------


def test_hf_lm_to_flamingo_wraps_decoder_layers():
    sd = {
        "model.embed_tokens.weight": torch.ones(1),
        "model.layers.0.self_attn.q_proj.weight": torch.ones(1),
        "model.layers.11.mlp.up_proj.weight": torch.ones(1),
        "model.layers.11.self_attn.rotary_emb.inv_freq": torch.ones(1),
        "model.norm.weight": torch.ones(1),
        "lm_head.weight": torch.ones(1),
    }
    converted, report = hf_lm_to_flamingo(sd)
    assert set(converted) == {
        "lang_encoder.model.embed_tokens.weight",
        "lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight",
        "lang_encoder.model.layers.11.decoder_layer.mlp.up_proj.weight",
        "lang_encoder.model.norm.weight",
        "lang_encoder.lm_head.weight",
    }
    assert report.dropped == ["model.layers.11.self_attn.rotary_emb.inv_freq"]
    mpt = hf_lm_to_flamingo(
        {"transformer.blocks.2.ffn.up_proj.weight": torch.ones(1), "transformer.wte.weight": torch.ones(1)}
    )[0]
    assert set(mpt) == {
        "lang_encoder.transformer.blocks.2.decoder_layer.ffn.up_proj.weight",
        "lang_encoder.transformer.wte.weight",
    }
    with pytest.raises(ValueError, match="already in Flamingo layout"):
        hf_lm_to_flamingo({"model.layers.0.decoder_layer.x": torch.ones(1)})
    with pytest.raises(ValueError, match="could not find the decoder layer list"):
        hf_lm_to_flamingo({"lm_head.weight": torch.ones(1)})


def test_detect_layers_path():
    assert detect_layers_path({"lang_encoder.model.layers.0.x": 0}, prefix="lang_encoder.") == "model.layers"
    assert detect_layers_path({"gpt_neox.layers.3.x": 0}) == "gpt_neox.layers"
    assert (
        detect_layers_path({"lang_encoder.custom.stack.3.decoder_layer.x": 0}, prefix="lang_encoder.") == "custom.stack"
    )
    assert detect_layers_path({}, default="model.layers") == "model.layers"


# ----- OpenFlamingo rename rules -------------------------------------------------------------------------------


def test_rename_v1_rules_for_every_layer_index():
    one = torch.ones(1)
    sd = {
        "perceiver.layers.0.0.to_q.weight": one,
        "perceiver.layers.11.0.norm_media.weight": one,
        "perceiver.layers.11.1.3.weight": one,
        "perceiver.latents": one,
        "lang_encoder.gated_cross_attn_layers.11.ff.1.weight": one,
        "lang_encoder.model.layers.11.gated_cross_attn_layer.ff.1.weight": one,
        "lang_encoder.model.layers.11.gated_cross_attn_layer.ff_gate": one,
        "lang_encoder.model.layers.11.decoder_layer.self_attn.rotary_emb.inv_freq": one,
        "lang_encoder.model.layers.12.self_attn.q_proj.weight": one,  # LLaMA weights merged without the wrapper
        "lang_encoder.model.embed_tokens.weight": one,
    }
    converted, report = rename_openflamingo_v1(sd)
    assert set(converted) == {
        "perceiver.layers.0.to_q.weight",
        "perceiver.layers.11.norm_media.weight",
        "perceiver.layers.11.feed_forward.3.weight",
        "perceiver.latents",
        "lang_encoder.model.layers.11.gated_cross_attn_layer.feed_forward.1.weight",
        "lang_encoder.model.layers.11.gated_cross_attn_layer.ff_gate",
        "lang_encoder.model.layers.12.decoder_layer.self_attn.q_proj.weight",
        "lang_encoder.model.embed_tokens.weight",
    }
    assert set(report.dropped) == {
        "lang_encoder.gated_cross_attn_layers.11.ff.1.weight",
        "lang_encoder.model.layers.11.decoder_layer.self_attn.rotary_emb.inv_freq",
    }
    assert report.renamed["perceiver.layers.11.1.3.weight"] == "perceiver.layers.11.feed_forward.3.weight"


def test_rename_touches_only_the_cross_attention_feed_forward():
    """The original rule replaced every 'ff' in LM keys; an LM's own 'ffn' (MPT) must survive."""
    one = torch.ones(1)
    sd = {
        "lang_encoder.transformer.blocks.1.decoder_layer.ffn.up_proj.weight": one,
        "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.ff.0.bias": one,
        "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.ff_gate": one,
    }
    converted, _ = rename_openflamingo_v2(sd)
    assert set(converted) == {
        "lang_encoder.transformer.blocks.1.decoder_layer.ffn.up_proj.weight",
        "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.feed_forward.0.bias",
        "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.ff_gate",
    }


def test_rename_recovers_a_block_saved_only_under_its_alias():
    weight = torch.randn(2)
    converted, report = rename_openflamingo_v1({"lang_encoder.gated_cross_attn_layers.3.ff.1.weight": weight})
    key = "lang_encoder.model.layers.3.gated_cross_attn_layer.feed_forward.1.weight"
    assert converted == {key: weight} and report.dropped == []


def test_rename_refuses_two_keys_for_one_place():
    with pytest.raises(ValueError, match="two checkpoint keys map to 'perceiver.layers.0.to_q.weight'"):
        rename_openflamingo_v1(
            {"perceiver.layers.0.0.to_q.weight": torch.ones(1), "perceiver.layers.0.to_q.weight": torch.ones(1)}
        )


def test_report_update():
    report = ConversionReport(renamed={"a": "b"}, dropped=["c"])
    report.update(ConversionReport(renamed={"d": "e"}, dropped=["f"]))
    assert report.renamed == {"a": "b", "d": "e"} and report.dropped == ["c", "f"]


# ----- vocabulary ------------------------------------------------------------------------------------------------


def test_pad_vocab_rows_appends_mean_rows():
    embed = torch.randn(5, 3)
    out = pad_vocab_rows({"lang_encoder.model.embed_tokens.weight": embed, "other": embed}, 7)
    padded = out["lang_encoder.model.embed_tokens.weight"]
    assert padded.shape == (7, 3) and torch.equal(padded[:5], embed)
    torch.testing.assert_close(padded[5:], embed.mean(0).expand(2, 3))
    assert out["other"] is embed
    with pytest.raises(ValueError, match="more than the vocabulary size 4"):
        pad_vocab_rows({"lang_encoder.model.embed_tokens.weight": embed}, 4)


def test_flamingo_to_otter_row_order():
    """OpenFlamingo rows (..., eoc, image, PAD) stay; one mean row is appended. Published Otter: <answer> is the old
    PAD row (rows - 1), <PAD> the new one (rows)."""
    embed, head = torch.randn(6, 4), torch.randn(6, 4)
    converted, ids = flamingo_to_otter(
        {"lang_encoder.model.embed_tokens.weight": embed, "lang_encoder.lm_head.weight": head}
    )
    assert ids == {"answer_token_id": 5, "pad_token_id": 6, "vocab_size": 7}
    for key, source in (("lang_encoder.model.embed_tokens.weight", embed), ("lang_encoder.lm_head.weight", head)):
        assert torch.equal(converted[key][:6], source)
        torch.testing.assert_close(converted[key][6], source.mean(0))
    with pytest.raises(ValueError, match="different row counts"):
        flamingo_to_otter(
            {"lang_encoder.model.embed_tokens.weight": embed, "lang_encoder.lm_head.weight": torch.ones(5, 4)}
        )
    with pytest.raises(ValueError, match="no embedding matrix"):
        flamingo_to_otter({"perceiver.latents": embed})


# ----- round trips -----------------------------------------------------------------------------------------------


def test_round_trip_openflamingo_v1_checkpoint(base_dirs, tmp_path):
    """OpenFlamingo v1 checkpoint.pt: trainable weights only, every block twice, inv_freq buffers; the frozen LLaMA
    and CLIP come from the base folders."""
    source, lm_dir, clip_dir = base_dirs
    checkpoint = to_openflamingo(state_dict_of(source), trainable_only=True, inv_freq=True)
    assert any(k.startswith("lang_encoder.gated_cross_attn_layers.") for k in checkpoint)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    converted, report = rename_openflamingo_v1(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert any(k.endswith("rotary_emb.inv_freq") for k in report.dropped)
    assert_round_trip(source, {**base_weights(lm_dir, clip_dir), **converted})


def test_round_trip_openflamingo_v1_full_state_dict_with_open_clip_clip(base_dirs):
    """A full OpenFlamingo v1 `Flamingo.state_dict()` keeps the whole open_clip CLIP model as `vision_encoder`: the
    tower sits under `vision_encoder.visual.`, beside the unused text tower, whose `transformer.resblocks.*` names
    are those of v2's visual keys. The text tower is dropped, never taken for the vision tower."""
    source = base_dirs[0]
    v1 = to_open_clip(to_openflamingo(state_dict_of(source), inv_freq=True), prefix_out="vision_encoder.visual.")
    text_tower = {
        "vision_encoder.token_embedding.weight": torch.randn(8, 4),
        "vision_encoder.positional_embedding": torch.randn(4, 4),
        "vision_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4),
        "vision_encoder.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(16, 4),
        "vision_encoder.ln_final.weight": torch.ones(4),
        "vision_encoder.text_projection": torch.randn(4, 4),
        "vision_encoder.logit_scale": torch.ones(()),
    }
    converted, report = rename_openflamingo_v1({**v1, **text_tower})
    assert set(text_tower) | {"vision_encoder.visual.proj"} <= set(report.dropped)
    assert_round_trip(source, converted)


def test_round_trip_openflamingo_v2_state_dict_with_open_clip_vision(base_dirs):
    """OpenFlamingo v2 `Flamingo.state_dict()`: open_clip visual keys (made from a real HF CLIP's tensors),
    `old_decoder_blocks` and `gated_cross_attn_layers` aliases, perceiver `.0`/`.1`."""
    source = base_dirs[0]
    v2 = to_open_clip(to_openflamingo(state_dict_of(source), old_decoder_blocks=True))
    assert "vision_encoder.transformer.resblocks.1.attn.in_proj_weight" in v2
    converted, report = rename_openflamingo_v2(v2)
    assert "vision_encoder.proj" in report.dropped
    assert_round_trip(source, converted)


def test_round_trip_ddp_training_checkpoint(base_dirs, tmp_path):
    """An OpenFlamingo v2 / Otter training checkpoint: `module.` keys under `model_state_dict`, with optimizer and
    scheduler state beside them."""
    source, lm_dir, clip_dir = base_dirs
    trainable = to_openflamingo(state_dict_of(source), trainable_only=True)
    trainable = {k: v for k, v in trainable.items() if not k.startswith("lang_encoder.gated_cross_attn_layers.")}
    torch.save(
        {
            "epoch": 2,
            "model_state_dict": {f"module.{k}": v for k, v in trainable.items()},
            "optimizer_state_dict": {
                "state": {0: {"step": torch.tensor(3.0)}},
                "param_groups": [{"lr": 1e-4, "params": [0]}],
            },
            "lr_scheduler_state_dict": {"last_epoch": 2},
        },
        tmp_path / "checkpoint_2.pt",
    )
    converted, _ = rename_openflamingo_v2(load_checkpoint(tmp_path / "checkpoint_2.pt"))
    assert_round_trip(source, {**base_weights(lm_dir, clip_dir), **converted})


def test_round_trip_otter_final_weights(tmp_path):
    """Otter's final_weights.pt: trainable weights (perceiver with frame embeddings, blocks, embed_tokens, lm_head)
    already in HF layout, plus inv_freq; merged onto the base LM and CLIP folders."""
    source = make_model(tiny_config("otter"), seed=2)
    assert source.perceiver.frame_embs is not None
    lm_dir, clip_dir = save_base(source, tmp_path)
    trainable = {
        k: v
        for k, v in state_dict_of(source).items()
        if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or "embed_tokens" in k or "lm_head" in k
    }
    trainable["lang_encoder.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    torch.save(trainable, tmp_path / "final_weights.pt")
    converted, report = rename_openflamingo_v2(load_checkpoint(tmp_path / "final_weights.pt"))
    assert report.dropped == ["lang_encoder.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"]
    assert_round_trip(source, {**base_weights(lm_dir, clip_dir), **converted})


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_round_trip_layer_indices_of_ten_and_more(layout):
    source = make_model(wide_config(), seed=3)
    sd = state_dict_of(source)
    if layout == "v1":
        converted, _ = rename_openflamingo_v1(to_openflamingo(sd, inv_freq=True))
    else:
        converted, _ = rename_openflamingo_v2(to_open_clip(to_openflamingo(sd, old_decoder_blocks=True)))
    assert "perceiver.layers.11.feed_forward.3.weight" in converted
    assert "lang_encoder.model.layers.11.gated_cross_attn_layer.feed_forward.3.weight" in converted
    assert_round_trip(source, converted)


def test_round_trip_openflamingo_v2_mpt_with_remote_code_names():
    """OpenFlamingo-3B style: MPT layers under `transformer.blocks`, MosaicML remote-code names."""
    source = make_model(mpt_config(), seed=4)
    remote = {
        r"\.decoder_layer\.norm_1\.": ".decoder_layer.ln_1.",
        r"\.decoder_layer\.norm_2\.": ".decoder_layer.ln_2.",
        r"\.decoder_layer\.ffn\.up_proj\.": ".decoder_layer.mlp.mlp_up.",
        r"\.decoder_layer\.ffn\.down_proj\.": ".decoder_layer.mlp.mlp_down.",
        r"^lang_encoder\.transformer\.norm_f\.": "lang_encoder.transformer.ln_f.",
    }
    v2 = {}
    for key, value in to_openflamingo(
        state_dict_of(source), layers="transformer.blocks", old_decoder_blocks=True
    ).items():
        for pattern, replacement in remote.items():
            key = re.sub(pattern, replacement, key)
        v2[key] = value
    assert "lang_encoder.transformer.blocks.1.decoder_layer.mlp.mlp_up.weight" in v2
    converted, _ = rename_openflamingo_v2(v2, mpt_remote_code_names=True)
    assert_round_trip(source, converted)


def test_round_trip_flamingo_to_otter():
    """An OpenFlamingo model becomes an Otter starting point: the old rows keep their logits, the new row exists."""
    source = make_model(tiny_config("flamingo"), seed=5)
    converted, ids = flamingo_to_otter(state_dict_of(source))
    config = tiny_config("otter", max_num_frames=None, answer_token_id=ids["answer_token_id"])
    config.text_config.vocab_size = ids["vocab_size"]
    target = make_model(config, seed=6)
    assert not target.load_state_dict(converted, strict=True).missing_keys
    torch.testing.assert_close(logits(target)[..., : ids["pad_token_id"]], logits(source), atol=ATOL, rtol=0)
    assert logits(target).shape[-1] == ids["vocab_size"] == 129


def test_converted_weights_save_and_reload_with_safetensors(base_dirs, tmp_path):
    """Converted tensors (split q/k/v included) can be written as safetensors and read back."""
    source = base_dirs[0]
    converted, _ = rename_openflamingo_v2(to_open_clip(to_openflamingo(state_dict_of(source), old_decoder_blocks=True)))
    save_file(converted, str(tmp_path / "model.safetensors"))
    assert_round_trip(source, load_checkpoint(tmp_path / "model.safetensors"))
