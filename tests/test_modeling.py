import pytest
import torch
from conftest import EOC, MEDIA, left_pad, make_images_matter, prompt, random_images, tiny_config, tiny_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoModel
from flamingo.modeling_flamingo import FlamingoLayer, compute_media_positions
from otter import OtterForConditionalGeneration, OtterModel


def logits_of(model, ids, vision_x, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, vision_x=vision_x, attention_mask=mask).logits


# ----- structure ---------------------------------------------------------------------------------------------------


def test_aliases_and_thin_subclass():
    assert FlamingoModel is FlamingoForConditionalGeneration
    assert OtterModel is OtterForConditionalGeneration
    assert issubclass(OtterForConditionalGeneration, FlamingoForConditionalGeneration)


def test_blocks_sit_before_every_nth_layer():
    model = tiny_model(cross_attn_every_n_layers=2)
    layers = model.lang_encoder.model.layers
    assert all(isinstance(layer, FlamingoLayer) for layer in layers)
    assert [i for i, layer in enumerate(layers) if layer.gated_cross_attn_layer is not None] == [1, 3]
    gates = [p for n, p in model.named_parameters() if n.endswith(("attn_gate", "ff_gate"))]
    assert len(gates) == 4
    assert all(torch.equal(g, torch.zeros(1)) for g in tiny_model(gates=None).parameters() if g.shape == (1,))


def test_patch_tokens_drop_cls():
    model = tiny_model()
    pixels = random_images(1, 1)[:, 0, 0]
    tokens = model.vision_encoder(pixels)
    full = model.vision_encoder.vision_model(pixel_values=pixels).last_hidden_state
    assert tokens.shape == (1, (32 // 8) ** 2, 16)
    torch.testing.assert_close(tokens, full[:, 1:])


def test_media_features_shape_with_frames():
    model = tiny_model("otter")
    media = model.get_media_features(random_images(2, 3, frames=4))
    assert media.shape == (2, 3, model.config.perceiver_num_latents, 16)
    with pytest.raises(ValueError, match="9 frames per image but config.max_num_frames is 8"):
        model.get_media_features(random_images(1, 1, frames=9))


def test_frame_embeddings_change_video_features():
    model = tiny_model("otter")
    video = random_images(1, 1, frames=3)
    before = model.get_media_features(video)
    with torch.no_grad():
        model.perceiver.frame_embs.normal_()
    assert not torch.allclose(before, model.get_media_features(video))


# ----- numerics ----------------------------------------------------------------------------------------------------


def bare_language_model(model: FlamingoForConditionalGeneration):
    """The LM alone, with the wrapped model's weights (wrapper names and cross-attention blocks removed)."""
    lm = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    state = {
        name.replace(".decoder_layer.", "."): tensor
        for name, tensor in model.lang_encoder.state_dict().items()
        if ".gated_cross_attn_layer." not in name
    }
    lm.load_state_dict(state, strict=True)
    return lm


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_closed_gates_give_the_bare_language_model(family):
    model = tiny_model(family, gates=None)  # gates as initialised: 0
    ids = torch.tensor([prompt("img", 5, "eoc", "img", 4)])
    ours = logits_of(model, ids, random_images(1, 2))
    bare = bare_language_model(model)(input_ids=ids).logits
    torch.testing.assert_close(ours, bare, atol=1e-5, rtol=0)


def test_open_gates_make_images_matter():
    model = tiny_model()
    ids = torch.tensor([prompt("img", 6)])
    first = logits_of(model, ids, random_images(1, 1, seed=1))
    second = logits_of(model, ids, random_images(1, 1, seed=2))
    assert (first - second).abs().max() > 1e-3


def test_compute_media_positions_both_rules():
    #                      s  img a  b  img c  eoc
    ids = torch.tensor([[1, MEDIA, 20, 21, MEDIA, 22, EOC]])
    previous = compute_media_positions(ids, MEDIA, attend_previous=True)
    assert previous.tolist() == [[0, 1, 1, 1, 2, 2, 2]]
    following = compute_media_positions(ids, MEDIA, attend_previous=False)
    # <image> sees its own image, text sees the next one, text after the last image sees none
    assert following.tolist() == [[1, 1, 2, 2, 2, 0, 0]]


def which_tokens_change(model, ids, change_image: int, num_images: int):
    """Bool (L,) of the tokens whose logits move when only image `change_image` (0-based) is replaced."""
    images = random_images(1, num_images, seed=3)
    changed = images.clone()
    changed[:, change_image] = random_images(1, 1, seed=4)[:, 0]
    delta = (logits_of(model, ids, images) - logits_of(model, ids, changed)).abs().amax(-1)[0]
    return delta > 1e-6


def single_block_model(attend_previous: bool):
    # One block before the first layer, so a token's output depends only on what that token attends to
    # (later layers' self-attention would spread the change to every later token).
    model = tiny_model(only_attend_previous=attend_previous, cross_attn_every_n_layers=4)
    layers = model.lang_encoder.model.layers
    layers[0].gated_cross_attn_layer, layers[3].gated_cross_attn_layer = layers[3].gated_cross_attn_layer, None
    layers[0].index = 0
    return model


@pytest.mark.parametrize("attend_previous", [True, False])
def test_each_token_attends_to_exactly_its_image(attend_previous):
    model = single_block_model(attend_previous)
    ids = torch.tensor([[1, MEDIA, 20, 21, MEDIA, 22, EOC]])
    positions = compute_media_positions(ids, MEDIA, attend_previous)[0]
    # Through self-attention, a change reaches every token at or after the first token that sees the image.
    for image in range(2):
        changed = which_tokens_change(model, ids, image, 2)
        sees = positions == image + 1
        first = int(sees.nonzero()[0])
        assert changed[first]
        assert not changed[:first].any(), f"tokens before position {first} changed with image {image}"
    # Text with position 0 sees no image: with one layer of self-attention before it, test the xattn directly.
    layer = model.lang_encoder.model.layers[0]
    media = model.get_media_features(random_images(1, 2))
    hidden = torch.randn(1, ids.shape[1], 32)
    key_values = layer.gated_cross_attn_layer.attn.media_key_values(media)
    attended = layer.gated_cross_attn_layer.attn(hidden, key_values, positions[None], 2)
    assert torch.equal(attended[0, positions == 0], torch.zeros_like(attended[0, positions == 0]))
    assert (attended[0, positions > 0].abs().sum(-1) > 0).all()


def tokens_kept_apart(model):
    """Zero every decoder layer's self-attention output projection: each token's logits then depend only on its
    own id and on the image(s) its cross-attention reads, so "which tokens change" is exactly "which tokens see"."""
    with torch.no_grad():
        for layer in model.lang_encoder.model.layers:
            layer.decoder_layer.self_attn.o_proj.weight.zero_()
    return model


# Two rows with their <image> tokens at different places, and the image each token must see (reference §1.3).
#            s  img    a   b   img    c   d
ATTEND_ROWS = [[1, MEDIA, 20, 21, MEDIA, 22, 23], [1, 20, MEDIA, 21, 22, MEDIA, 23]]
EXPECTED_IMAGE = {
    # True: the latest <image> at or before the token; text before the first <image> sees nothing.
    True: [[0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2]],
    # False: <image> sees its own image, text sees the next one, text after the row's last <image> sees nothing.
    False: [[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 2, 2, 2, 0]],
}


@pytest.mark.parametrize("attend_previous", [True, False])
def test_a_token_sees_only_its_own_image_not_every_earlier_one(attend_previous):
    model = tokens_kept_apart(tiny_model(only_attend_previous=attend_previous))
    ids = torch.tensor(ATTEND_ROWS)
    expected = torch.tensor(EXPECTED_IMAGE[attend_previous])
    images = random_images(2, 2, seed=3)
    base = logits_of(model, ids, images)
    # The isolation holds: changing one text token moves only that token's logits.
    other_ids = ids.clone()
    other_ids[:, 3] = 30
    moved = (logits_of(model, other_ids, images) - base).abs().amax(-1) > 1e-6
    assert moved.tolist() == [[i == 3 for i in range(7)]] * 2
    for image in range(2):
        changed_images = images.clone()
        changed_images[:, image] = random_images(2, 1, seed=4 + image)[:, 0]
        delta = (logits_of(model, ids, changed_images) - base).abs().amax(-1)  # (B, L)
        sees = expected == image + 1
        assert (delta[sees] > 1e-3).all(), f"tokens that see image {image + 1} did not change: {delta}"
        assert (delta[~sees] <= 1e-6).all(), f"tokens that do not see image {image + 1} changed: {delta}"
    # Masking is per row: changing row 0's images leaves row 1 untouched.
    changed_images = images.clone()
    changed_images[0] = random_images(1, 2, seed=6)[0]
    delta = (logits_of(model, ids, changed_images) - base).abs().amax(-1)
    assert (delta[0][expected[0] > 0] > 1e-3).all()
    assert (delta[1] <= 1e-6).all()


def test_media_placement_augmentation_draws_either_rule_in_training_only():
    model = tokens_kept_apart(tiny_model(use_media_placement_augmentation=False))
    ids = torch.tensor(ATTEND_ROWS)
    images = random_images(2, 2, seed=3)
    reference = {}
    for attend_previous in (True, False):
        model.config.only_attend_previous = attend_previous
        reference[attend_previous] = logits_of(model, ids, images)
    assert (reference[True] - reference[False]).abs().max() > 1e-3

    model.config.use_media_placement_augmentation = True
    for attend_previous in (True, False):  # eval: deterministic, the configured rule, whatever the RNG
        model.config.only_attend_previous = attend_previous
        for seed in range(3):
            torch.manual_seed(seed)
            torch.testing.assert_close(logits_of(model, ids, images), reference[attend_previous], atol=0, rtol=0)

    model.train()  # the tiny configs have no dropout: only the rule is random
    assert model.config.text_config.attention_dropout == 0 and model.config.vision_config.attention_dropout == 0
    torch.manual_seed(0)
    drawn = []
    for _ in range(40):
        logits = logits_of(model, ids, images)
        matches = [rule for rule, ref in reference.items() if (logits - ref).abs().max() <= 1e-5]
        assert len(matches) == 1, "a training forward matched neither rule (or the rule was drawn per row)"
        drawn.append(matches[0])
    assert 8 <= drawn.count(True) <= 32, drawn

    model.config.use_media_placement_augmentation = False  # training without augmentation: the configured rule
    for _ in range(5):
        torch.testing.assert_close(logits_of(model, ids, images), reference[False], atol=1e-5, rtol=0)


def test_otter_ignores_media_placement_augmentation_as_otter_trained():
    model = tokens_kept_apart(tiny_model("otter", only_attend_previous=True, use_media_placement_augmentation=True))
    ids, images = torch.tensor(ATTEND_ROWS), random_images(2, 2, seed=3)
    reference = logits_of(model, ids, images)
    model.config.only_attend_previous = False
    assert (logits_of(model, ids, images) - reference).abs().max() > 1e-3  # the rule matters for these prompts
    model.config.only_attend_previous = True
    model.train()
    torch.manual_seed(0)
    for _ in range(12):  # Flamingo would draw attend-previous off about half of these
        torch.testing.assert_close(logits_of(model, ids, images), reference, atol=1e-5, rtol=0)


def test_image_token_beyond_the_images_is_an_error_not_silently_blind():
    model = tiny_model()
    ids = torch.tensor([prompt("img", 3, "img", 3, "img")])
    with pytest.raises(ValueError, match="3 <image> tokens but vision_x holds only 2 images"):
        logits_of(model, ids, random_images(1, 2))


def test_prompt_without_image_token_sees_no_image():
    model = tiny_model(only_attend_previous=True)
    ids = torch.tensor([prompt(8)])
    torch.testing.assert_close(
        logits_of(model, ids, random_images(1, 1, seed=1)), logits_of(model, ids, random_images(1, 1, seed=2))
    )


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_left_padded_batch_equals_each_prompt_alone(family):
    model = tiny_model(family)
    rows = [prompt("img", 9, seed=1), prompt("img", 3, "eoc", "img", 2, seed=2), prompt(2, "img", 5, seed=3)]
    images = random_images(3, 2, seed=5)
    images[0, 1] = 0  # samples with one image carry an all-zero second image
    images[2, 1] = 0
    ids, mask = left_pad(rows)
    batched = logits_of(model, ids, images, mask)
    for i, row in enumerate(rows):
        alone = logits_of(model, torch.tensor([row]), images[i : i + 1, : 1 + (i == 1)])
        torch.testing.assert_close(batched[i, -len(row) :], alone[0], atol=1e-4, rtol=0)


def test_loss_is_shifted_cross_entropy():
    model = tiny_model()
    ids = torch.tensor([prompt("img", 7)])
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, vision_x=random_images(1, 1), labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_lang_x_alias():
    model = tiny_model()
    ids = torch.tensor([prompt("img", 4)])
    images = random_images(1, 1)
    torch.testing.assert_close(model(lang_x=ids, vision_x=images).logits, logits_of(model, ids, images))


# ----- training flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_gradients_reach_perceiver_and_cross_attention_only(family):
    model = tiny_model(family).train()
    ids = torch.tensor([prompt("img", 6, "img", 4)])
    model(input_ids=ids, vision_x=random_images(1, 2), labels=ids).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(name.startswith("perceiver.layers") for name in trained)
    assert any(".gated_cross_attn_layer.attn." in name for name in trained)
    assert any(name.endswith("attn_gate") for name in trained)
    assert "lang_encoder.model.embed_tokens.weight" in trained
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & trained
    frozen_parts = ("vision_encoder.", ".decoder_layer.", "lang_encoder.model.norm.", "lang_encoder.lm_head.")
    assert all(any(part in name for part in frozen_parts) for name in frozen), frozen
    assert any(".decoder_layer.self_attn." in name for name in frozen)
    assert ("lang_encoder.lm_head.weight" in trained) == (family == "otter")


def test_unfrozen_towers_train():
    model = tiny_model(freeze_vision_encoder=False, freeze_lang_encoder=False)
    assert all(p.requires_grad for p in model.parameters())


# ----- save / load ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", [None, "60KB"])
@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_save_load_round_trip(family, shard, tmp_path):
    model = tiny_model(family)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == (shard is not None), files
    loaded = type(model).from_pretrained(tmp_path).eval()
    ids = torch.tensor([prompt("img", 5, "img", 2)])
    images = random_images(1, 2)
    torch.testing.assert_close(logits_of(loaded, ids, images), logits_of(model, ids, images), atol=0, rtol=0)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


def published_layout_keys(config: FlamingoConfig) -> set[str]:
    """The key list of the published HF checkpoints (reference §4b), for a given config's shapes."""
    keys = {"perceiver.latents", "perceiver.norm.weight", "perceiver.norm.bias"}
    v = "vision_encoder.vision_model."
    keys |= {v + "embeddings.class_embedding", v + "embeddings.patch_embedding.weight"}
    keys |= {v + "embeddings.position_embedding.weight"}
    keys |= {v + f"{ln}.{wb}" for ln in ("pre_layrnorm", "post_layernorm") for wb in ("weight", "bias")}
    for i in range(config.vision_config.num_hidden_layers):
        layer = f"{v}encoder.layers.{i}."
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            keys |= {layer + part + ".weight", layer + part + ".bias"}
        for part in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {layer + part + ".weight", layer + part + ".bias"}
    for i in range(config.perceiver_depth):
        layer = f"perceiver.layers.{i}."
        keys |= {layer + f"{ln}.{wb}" for ln in ("norm_media", "norm_latents") for wb in ("weight", "bias")}
        keys |= {layer + f"{p}.weight" for p in ("to_q", "to_kv", "to_out", "feed_forward.1", "feed_forward.3")}
        keys |= {layer + "feed_forward.0.weight", layer + "feed_forward.0.bias"}
    keys |= {"lang_encoder.model.embed_tokens.weight", "lang_encoder.model.norm.weight", "lang_encoder.lm_head.weight"}
    for i in range(config.text_config.num_hidden_layers):
        layer = f"lang_encoder.model.layers.{i}."
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.add(layer + f"decoder_layer.self_attn.{part}.weight")
        for part in ("gate_proj", "up_proj", "down_proj"):
            keys.add(layer + f"decoder_layer.mlp.{part}.weight")
        keys |= {
            layer + "decoder_layer.input_layernorm.weight",
            layer + "decoder_layer.post_attention_layernorm.weight",
        }
        if (i + 1) % config.cross_attn_every_n_layers == 0:
            x = layer + "gated_cross_attn_layer."
            keys |= {x + "attn_gate", x + "ff_gate", x + "attn.norm.weight", x + "attn.norm.bias"}
            keys |= {x + f"attn.{p}.weight" for p in ("to_q", "to_kv", "to_out")}
            keys |= {x + "feed_forward.0.weight", x + "feed_forward.0.bias"}
            keys |= {x + "feed_forward.1.weight", x + "feed_forward.3.weight"}
    return keys


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_published_key_layout_loads_without_renaming(family, tmp_path):
    model = tiny_model(family, max_num_frames=None)
    config = model.config
    expected = published_layout_keys(config)
    assert set(model.state_dict()) == expected
    # A checkpoint written in that layout, with the legacy leftovers old releases carry, loads cleanly.
    source = tiny_model(family, seed=7, max_num_frames=None)
    state = {key: tensor.contiguous() for key, tensor in source.state_dict().items()}
    state["lang_encoder.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    state["lang_encoder.gated_cross_attn_layers.1.attn_gate"] = torch.ones(1)
    config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    ids = torch.tensor([prompt("img", 5)])
    images = random_images(1, 1)
    torch.testing.assert_close(logits_of(loaded.eval(), ids, images), logits_of(source, ids, images))


# ----- bad input -------------------------------------------------------------------------------------------------------


def test_bad_vision_x_shapes_say_what_was_expected():
    model = tiny_model()
    ids = torch.tensor([prompt("img", 3)])
    with pytest.raises(ValueError, match=r"expected a 6-d tensor \(B, T_img, F, C, H, W\), got shape \(1, 3, 32, 32\)"):
        model(input_ids=ids, vision_x=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="vision_x has batch size 2 but input_ids has batch size 1"):
        model(input_ids=ids, vision_x=random_images(2, 1))
    with pytest.raises(ValueError, match=r"expected images of \(C, H, W\) = \(3, 32, 32\), got \(1, 32, 32\)"):
        model(input_ids=ids, vision_x=torch.zeros(1, 1, 1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"at least one image \(T_img >= 1\).*got shape \(1, 0, 1, 3, 32, 32\)"):
        model(input_ids=ids, vision_x=torch.zeros(1, 0, 1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(3, 64, 64\)"):
        model(input_ids=ids, vision_x=torch.zeros(1, 1, 1, 3, 64, 64))


# ----- other decoder families ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text_config",
    [
        {"model_type": "qwen2", "num_key_value_heads": 2},
        {"model_type": "mistral", "num_key_value_heads": 2},
        {"model_type": "gpt_neox", "intermediate_size": 64, "use_parallel_residual": True},
    ],
)
def test_other_decoder_families(text_config, tmp_path):
    config = tiny_config()
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4}
    common |= {
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    raw = config.to_dict()
    raw["text_config"] = common | text_config
    config = FlamingoConfig.from_dict(raw)
    torch.manual_seed(0)
    model = FlamingoForConditionalGeneration(config).eval()
    layers = model.decoder_layers()
    assert len(layers) == 4 and all(isinstance(layer, FlamingoLayer) for layer in layers)
    ids = torch.tensor([prompt("img", 6)])
    images = random_images(1, 1)
    closed = logits_of(model, ids, images)
    bare = model.lang_encoder  # with closed gates, the wrapped LM is the LM
    torch.testing.assert_close(closed, bare(input_ids=ids).logits, atol=1e-5, rtol=0)
    make_images_matter(model)
    assert (logits_of(model, ids, images) - logits_of(model, ids, random_images(1, 1, seed=9))).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    loaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(loaded, ids, images), logits_of(model, ids, images), atol=0, rtol=0)


def test_resize_token_embeddings_keeps_rows_and_config():
    model = tiny_model()
    before = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(131)
    after = model.get_input_embeddings().weight
    assert after.shape == (131, 32)
    assert model.get_output_embeddings().weight.shape == (131, 32)
    torch.testing.assert_close(after[:128], before)
    assert model.config.text_config.vocab_size == 131
    ids = torch.tensor([prompt("img", 3) + [130]])
    assert logits_of(model, ids, random_images(1, 1)).shape == (1, ids.shape[1], 131)


def test_attn_implementation_reaches_language_and_vision_models():
    config = tiny_config()
    for implementation in ("eager", "sdpa"):
        model = FlamingoForConditionalGeneration._from_config(config, attn_implementation=implementation)
        assert model.lang_encoder.config._attn_implementation == implementation
        assert model.vision_encoder.vision_model.config._attn_implementation == implementation
