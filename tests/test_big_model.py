"""Big models on small machines: device_map sharding with CPU + disk offload, bitsandbytes quantisation on CPU,
attention backends, bf16/fp16, gradient checkpointing, and the memory planner (`otter.memory`)."""

import functools
import json
import os

import bitsandbytes as bnb
import pytest
import torch
from conftest import CONFIGS, left_pad, prompt, random_images, tiny_config, tiny_model
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.integrations.accelerate import infer_auto_device_map

from flamingo import FlamingoForConditionalGeneration, modeling_flamingo
from flamingo.modeling_flamingo import FlamingoLayer, MediaCache
from otter import OtterConfig, OtterForConditionalGeneration
from otter.memory import estimate, load_config, main, parse_devices

L = "lang_encoder.model."


def nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def no_split_units(model) -> set[str]:
    return {name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules}


def assert_never_splits(model, device_map: dict):
    units = no_split_units(model)
    assert any(type(m).__name__ == "FlamingoLayer" for m in model.modules())
    for key in device_map:
        inside = [unit for unit in units if key.startswith(unit + ".")]
        assert not inside, f"device_map entry {key!r} splits {inside}"


@pytest.fixture(scope="module")
def inputs():
    ids, mask = left_pad([prompt("img", 6, "eoc", "img", 4, seed=0), prompt("img", 3, "eoc", "img", 7, seed=1)])
    return ids, mask, random_images(2, 2, seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Otter with open gates and unit-scale vision weights (so images matter), saved as safetensors."""
    model = tiny_model("otter", seed=0)
    path = tmp_path_factory.mktemp("tiny-otter")
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def reference(checkpoint, inputs):
    _, model = checkpoint
    ids, mask, images = inputs
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, vision_x=images).logits
    tokens = model.generate(input_ids=ids, attention_mask=mask, vision_x=images, max_new_tokens=4, do_sample=False)
    return logits, tokens


def cpu_budget(model) -> int:
    """Room on the CPU for the vision tower, the perceiver, the embeddings and the first decoder layer, plus the
    largest layer accelerate keeps free on its main device: everything after that goes to disk."""
    layers = model.decoder_layers()
    first = model.vision_encoder, model.perceiver, model.get_input_embeddings(), layers[0]
    return sum(nbytes(m) for m in first) + max(nbytes(layer) for layer in layers) + 1024


def explicit_map():
    return {
        "vision_encoder": "disk",
        "perceiver": "cpu",
        L + "embed_tokens": "disk",
        L + "layers.0": "cpu",
        L + "layers.1": "disk",
        L + "layers.2": "cpu",
        L + "layers.3": "disk",
        L + "norm": "cpu",
        L + "rotary_emb": "cpu",
        "lang_encoder.lm_head": "disk",
    }


# ----- device_map ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential", "explicit"])
def test_device_map_with_cpu_and_disk_offload_matches_unsharded(checkpoint, inputs, reference, tmp_path, device_map):
    path, model = checkpoint
    ids, mask, images = inputs
    sharded = OtterForConditionalGeneration.from_pretrained(
        path,
        device_map=explicit_map() if device_map == "explicit" else device_map,
        max_memory={"cpu": cpu_budget(model), "disk": 10**9},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    placement = sharded.hf_device_map
    assert len(placement) >= 3 and set(placement.values()) == {"cpu", "disk"}, placement
    assert_never_splits(sharded, placement)
    # Disk-offloaded weights really are not in memory: they sit on "meta" until their module runs.
    assert any(p.device.type == "meta" for p in sharded.parameters())

    with torch.no_grad():
        logits = sharded(input_ids=ids, attention_mask=mask, vision_x=images).logits
    torch.testing.assert_close(logits, reference[0], rtol=0, atol=1e-6)
    if device_map in ("auto", "explicit"):  # on a CPU-only machine "balanced"/"sequential" give the "auto" map
        tokens = sharded.generate(
            input_ids=ids, attention_mask=mask, vision_x=images, max_new_tokens=4, do_sample=False
        )
        assert torch.equal(tokens, reference[1])


def test_device_map_keeps_tied_embeddings_together(tmp_path, inputs):
    model = tiny_model("otter", seed=1)
    model.config.text_config.tie_word_embeddings = True
    model = OtterForConditionalGeneration(model.config).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "tied")
    ids, mask, images = inputs
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, vision_x=images).logits

    sharded = OtterForConditionalGeneration.from_pretrained(
        tmp_path / "tied",
        device_map="auto",
        max_memory={"cpu": cpu_budget(model), "disk": 10**9},
        offload_folder=str(tmp_path / "offload"),
    )
    placement = sharded.hf_device_map
    assert set(placement.values()) == {"cpu", "disk"}
    assert placement.get("lang_encoder.lm_head", placement.get("lang_encoder")) == placement.get(
        L + "embed_tokens", placement.get("lang_encoder")
    )
    with torch.no_grad():
        logits = sharded(input_ids=ids, attention_mask=mask, vision_x=images).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_auto_map_over_gpus_cpu_and_disk_never_splits_a_wrapper_layer():
    # The map `device_map="auto"` would compute on a 2-GPU machine (device ids need not exist to plan).
    with torch.device("meta"):
        model = OtterForConditionalGeneration(tiny_config("otter"))
    layers = model.decoder_layers()
    largest = max(nbytes(layer) for layer in layers)
    # Just too small for the vision tower, the perceiver, the embeddings and layer 0 together: each device takes a
    # share and the rest spills over to the next one, then to disk.
    budget = (
        sum(nbytes(m) for m in (model.vision_encoder, model.perceiver, model.get_input_embeddings(), layers[0])) - 1
    )
    placement = infer_auto_device_map(
        model,
        # GPU 0 and the CPU keep room for the largest layer (accelerate's rule for main devices).
        max_memory={0: largest + budget, 1: budget, "cpu": largest + budget, "disk": 10**9},
        no_split_module_classes=model._no_split_modules,
    )
    assert {0, 1, "cpu", "disk"} <= set(placement.values()), placement
    assert_never_splits(model, placement)


def test_offload_hooks_move_media_kwargs_to_the_layer_device(checkpoint, tmp_path):
    # Every FlamingoLayer gets an accelerate hook that moves tensors in *kwargs* (media, media_positions) to its
    # execution device; the MediaCache is skipped (`_skip_keys_device_placement`). Point the hook at "meta" to see
    # the move on a CPU-only machine.
    path, model = checkpoint
    sharded = OtterForConditionalGeneration.from_pretrained(
        path, device_map="auto", max_memory={"cpu": cpu_budget(model), "disk": 10**9}, offload_folder=str(tmp_path)
    )
    layer = next(layer for layer in sharded.decoder_layers() if layer.gated_cross_attn_layer is not None)
    assert isinstance(layer, FlamingoLayer)
    hook = layer._hf_hook
    cache = MediaCache()
    hook.execution_device = torch.device("meta")
    try:
        args, kwargs = hook.pre_forward(
            layer,
            torch.zeros(1, 3, 32),
            media=torch.zeros(1, 2, 8, 16),
            media_positions=torch.zeros(1, 3, dtype=torch.long),
            media_cache=cache,
        )
    finally:
        hook.execution_device = torch.device("cpu")
    assert args[0].device.type == "meta"
    assert kwargs["media"].device.type == "meta" and kwargs["media_positions"].device.type == "meta"
    assert kwargs["media_cache"] is cache
    assert {"media_cache", "cache"} <= set(hook.skip_keys)


# ----- quantisation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantization_config", "linear_class", "weight_dtype"),
    [
        (BitsAndBytesConfig(load_in_8bit=True), bnb.nn.Linear8bitLt, torch.int8),
        (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), bnb.nn.Linear4bit, torch.uint8),
    ],
    ids=["int8", "int4"],
)
def test_bitsandbytes_on_cpu_quantises_only_the_lm_body(
    checkpoint, inputs, quantization_config, linear_class, weight_dtype
):
    path, _ = checkpoint
    ids, mask, images = inputs
    model = OtterForConditionalGeneration.from_pretrained(path, quantization_config=quantization_config)
    assert model.is_quantized
    assert quantization_config.llm_int8_skip_modules is None  # the caller's config is not modified
    assert model.config.quantization_config.llm_int8_skip_modules == model._quantization_skip_modules
    quantised, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (quantised if isinstance(module, linear_class) else kept).append(name)
    assert quantised and all(".decoder_layer." in name for name in quantised)
    for name in quantised:
        assert model.get_submodule(name).weight.dtype == weight_dtype
    lm_linears = {n for n, m in model.named_modules() if ".decoder_layer." in n and isinstance(m, nn.Linear)}
    assert set(quantised) == lm_linears
    for name in kept:
        assert (
            name.startswith(("vision_encoder.", "perceiver.", "lang_encoder.lm_head"))
            or ".gated_cross_attn_layer." in name
        )
        assert model.get_submodule(name).weight.dtype == torch.float32
    assert any(".gated_cross_attn_layer." in name for name in kept)
    for name, param in model.named_parameters():
        if name.endswith(("attn_gate", "ff_gate")):
            assert param.dtype == torch.float32

    tokens = model.generate(input_ids=ids, attention_mask=mask, vision_x=images, max_new_tokens=4, do_sample=False)
    assert tokens.shape[0] == 2 and tokens.shape[1] > ids.shape[1]
    assert int(tokens.max()) < model.config.text_config.vocab_size


# ----- attention backends -------------------------------------------------------------------------------------------


def fake_xformers(monkeypatch, calls: list):
    """An `xformers.ops.memory_efficient_attention` written from xformers' documented contract ((N, L, heads, dh)
    tensors, an additive bias of (N, heads, Lq, Lk) whose rows are 16-byte aligned), recording its calls."""
    import sys
    import types

    def memory_efficient_attention(query, key, value, attn_bias=None):
        calls.append(query.device.type)
        if attn_bias is not None:
            assert attn_bias.shape == (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
            assert attn_bias.stride(-2) % 8 == 0, "xformers needs 16-byte aligned bias rows"
        scores = torch.einsum("nqhd,nkhd->nhqk", query, key) * query.shape[-1] ** -0.5
        if attn_bias is not None:
            scores = scores + attn_bias
        return torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), value)

    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    modeling_flamingo.xformers_ops.cache_clear()
    monkeypatch.setattr(modeling_flamingo, "xformers_ops", functools.cache(modeling_flamingo.xformers_ops.__wrapped__))


@pytest.mark.parametrize("masked", [False, True], ids=["perceiver", "cross-attention"])
def test_xformers_path_matches_sdpa(monkeypatch, masked):
    calls = []
    fake_xformers(monkeypatch, calls)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, length, 16, generator=generator) for length in (5, 13, 13))
    # Text tokens that see one of two images' latents (13 keys: 6 and 7), and a row allowed everywhere.
    mask = torch.zeros(2, 1, 5, 13, dtype=torch.bool)
    mask[..., :3, :6] = True
    mask[..., 3, 6:] = True
    mask[..., 4, :] = True
    attn_mask = mask if masked else None
    expected = modeling_flamingo.attend(q, k, v, attn_mask, use_xformers=False)
    got = modeling_flamingo.attend(q, k, v, attn_mask, use_xformers=True)
    assert calls == ["cpu"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_xformers_is_used_only_on_cuda(monkeypatch, checkpoint, inputs, reference):
    """Installed but on the CPU: the model keeps to SDPA (xformers' CPU kernels are slow or missing)."""
    calls = []
    fake_xformers(monkeypatch, calls)
    _, model = checkpoint
    ids, mask, images = inputs
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, vision_x=images).logits
    assert calls == []
    torch.testing.assert_close(logits, reference[0])


def test_forcing_xformers_without_it_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail
    monkeypatch.setattr(modeling_flamingo, "xformers_ops", functools.cache(modeling_flamingo.xformers_ops.__wrapped__))
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ImportError, match=r"otter-flamingo\[xformers\]"):
        modeling_flamingo.attend(q, q, q, use_xformers=True)


def test_attn_implementation_reaches_the_lm_and_clip(checkpoint, inputs):
    path, _ = checkpoint
    ids, mask, images = inputs
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = OtterForConditionalGeneration.from_pretrained(path, attn_implementation=implementation).eval()
        assert model.lang_encoder.config._attn_implementation == implementation
        assert model.vision_encoder.vision_model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, attention_mask=mask, vision_x=images).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=0, atol=1e-4)

    model.set_attn_implementation("eager")  # switching after loading reaches both towers too
    assert model.lang_encoder.config._attn_implementation == "eager"
    assert model.vision_encoder.vision_model.config._attn_implementation == "eager"
    with torch.no_grad():
        switched = model(input_ids=ids, attention_mask=mask, vision_x=images).logits
    torch.testing.assert_close(switched, logits["eager"], rtol=0, atol=1e-4)


# ----- precision ----------------------------------------------------------------------------------------------------


def test_bf16_forward_top1_agrees_with_fp32(checkpoint, inputs, reference):
    path, _ = checkpoint
    ids, mask, images = inputs
    model = OtterForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert model.lang_encoder.dtype == torch.bfloat16 and model.perceiver.latents.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, vision_x=images).logits.float()
        other_images = model(input_ids=ids, attention_mask=mask, vision_x=images.flip(0)).logits.float()
    expected, real = reference[0], mask.bool()
    error = (logits - expected).abs().max()
    assert error < 0.02
    assert (other_images - logits).abs().max() > 10 * error  # the images matter far more than the rounding
    agreement = (logits.argmax(-1) == expected.argmax(-1))[real].float().mean()
    assert agreement >= 0.9  # 28/28 on this seed; a near-tie may flip on another CPU's bf16 kernels


def test_fp16_keeps_vision_perceiver_and_gates_in_fp32(checkpoint, inputs, reference):
    path, _ = checkpoint
    ids, mask, images = inputs
    model = OtterForConditionalGeneration.from_pretrained(path, dtype=torch.float16).eval()
    for name, param in model.named_parameters():
        high = name.startswith(("vision_encoder.", "perceiver.")) or name.endswith(("attn_gate", "ff_gate"))
        assert param.dtype == (torch.float32 if high else torch.float16), name
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, vision_x=images).logits.float()
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference[0], rtol=0, atol=5e-3)


# ----- gradient checkpointing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(inputs, enable):
    """transformers 5.x's name and its deprecated alias (the one the issue and most scripts use) both work."""
    ids, mask, images = inputs
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for checkpointing in (False, True):
        model = tiny_model("otter", seed=2, freeze_lang_encoder=False, freeze_vision_encoder=False).train()
        assert model.config.text_config.attention_dropout == 0 and model.config.vision_config.attention_dropout == 0
        if checkpointing:
            getattr(model, enable)()  # transformers' default: non-reentrant
            assert all(layer.gradient_checkpointing for layer in model.decoder_layers())
        loss = model(input_ids=ids, attention_mask=mask, vision_x=images, labels=labels).loss
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    assert any(".gated_cross_attn_layer." in name for name in grads) and any("perceiver." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)


def test_reentrant_gradient_checkpointing_is_refused():
    model = tiny_model("otter").train()
    with pytest.raises(ValueError, match="use_reentrant"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert not any(layer.gradient_checkpointing for layer in model.decoder_layers())


# ----- memory planner -----------------------------------------------------------------------------------------------


def analytic_counts(config) -> dict[str, int]:
    """Closed-form parameter counts of CLIP + perceiver + cross-attention + LLaMA, independent of the modules."""
    v, t = config.vision_config, config.text_config
    d, i = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    vision = d + 3 * v.patch_size**2 * d + (patches + 1) * d + 2 * d  # class, patch conv, positions, pre-LN
    vision += v.num_hidden_layers * (4 * (d * d + d) + 4 * d + (d * i + i) + (i * d + d)) + 2 * d  # layers, post-LN
    inner = config.perceiver_heads * config.perceiver_dim_head
    ff = 2 * d + 2 * d * d * config.perceiver_ff_mult
    perceiver = config.perceiver_num_latents * d + (config.max_num_frames or 0) * d + 2 * d
    perceiver += config.perceiver_depth * (4 * d + d * inner + 2 * d * inner + inner * d + ff)
    h, x_inner = t.hidden_size, config.cross_attn_heads * config.cross_attn_dim_head
    block = 2 * h + h * x_inner + 2 * d * x_inner + x_inner * h + 1 + 2 * h + 2 * h * h * config.cross_attn_ff_mult + 1
    head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
    attn = h * t.num_attention_heads * head_dim * 2 + 2 * h * t.num_key_value_heads * head_dim
    layer = attn + 3 * h * t.intermediate_size + 2 * h
    return {
        "vision": vision,
        "perceiver": perceiver,
        "cross_attention": block * len(config.cross_attn_layer_indices()),
        "lm_embeddings": t.vocab_size * h,
        "lm_layers": t.num_hidden_layers * layer + h,
        "lm_head": 0 if t.tie_word_embeddings else t.vocab_size * h,
    }


def real_counts(model) -> dict[str, int]:
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    blocks = [layer.gated_cross_attn_layer for layer in model.decoder_layers() if layer.gated_cross_attn_layer]
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    out = {
        "vision": count(model.vision_encoder.parameters()),
        "perceiver": count(model.perceiver.parameters()),
        "cross_attention": sum(count(b.parameters()) for b in blocks),
        "lm_embeddings": count(model.get_input_embeddings().parameters()),
        "lm_head": 0 if tied else count(head.parameters()),
    }
    out["lm_layers"] = count(model.parameters()) - sum(out.values())
    return out


@pytest.mark.parametrize("name", ["otter-tiny", "otter-small", "flamingo-tiny"])
def test_estimate_counts_equal_the_real_parameters(name):
    config = load_config(CONFIGS / f"{name}.json")
    model_class = OtterForConditionalGeneration if isinstance(config, OtterConfig) else FlamingoForConditionalGeneration
    with torch.device("meta"):
        real = model_class(config)
    real = real.to_empty(device="cpu")  # real CPU tensors (uninitialised: random init of ~120M params is slow)
    result = estimate(CONFIGS / f"{name}.json", dtype="fp32")
    counts = {part: result.parts[part].params for part in result.parts}
    assert counts == real_counts(real)
    assert counts == analytic_counts(config)
    assert result.total_params == sum(p.numel() for p in real.parameters())
    assert result.total_bytes == sum(p.numel() * p.element_size() for p in real.parameters())


def quantised_bytes(model) -> dict[str, int]:
    """Bytes the loaded model really holds per part, quantisation scales included."""

    def size(params):
        total = 0
        for p in params:
            total += p.numel() * p.element_size()
            if isinstance(p, bnb.nn.Int8Params) and p.SCB is not None:
                total += p.SCB.numel() * p.SCB.element_size()
        return total

    blocks = [layer.gated_cross_attn_layer for layer in model.decoder_layers() if layer.gated_cross_attn_layer]
    out = {
        "vision": size(model.vision_encoder.parameters()),
        "perceiver": size(model.perceiver.parameters()),
        "cross_attention": sum(size(b.parameters()) for b in blocks),
        "lm_embeddings": size(model.get_input_embeddings().parameters()),
        "lm_head": size(model.get_output_embeddings().parameters()),
    }
    out["lm_layers"] = size(model.parameters()) - sum(out.values())
    return out


@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [("bf16", None), ("fp16", None), ("fp32", "int8"), ("bf16", "int8")],
)
def test_estimate_bytes_equal_the_real_allocations(checkpoint, dtype, quantization):
    path, _ = checkpoint
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    kwargs = {"dtype": torch_dtype}
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = OtterForConditionalGeneration.from_pretrained(path, **kwargs)
    result = estimate(path, dtype=dtype, quantization=quantization)  # a checkpoint folder works as the config
    assert {part: result.parts[part].bytes for part in result.parts} == quantised_bytes(model)
    if quantization:
        assert result.parts["lm_layers"].quantized_params > 0
        assert result.parts["cross_attention"].quantized_params == 0


def test_fits_plans_the_9b_model_on_two_consumer_gpus():
    bf16 = estimate(CONFIGS / "otter-9b.json", dtype="bf16")
    assert 8.0e9 < bf16.total_params < 8.5e9
    assert bf16.parts["cross_attention"].params > 1e9
    plan = bf16.fits("2x24GB")
    assert plan.fits and plan.offloaded_bytes == 0
    gpus = [device for device in plan.devices if device.blocks]
    assert [d.device for d in gpus] == ["gpu0", "gpu1"]
    assert sum(d.bytes for d in gpus) == bf16.total_bytes
    layers = [b for d in gpus for b in d.blocks if b.startswith(L + "layers.")]
    assert layers == [f"{L}layers.{i}" for i in range(32)]  # every wrapper layer whole, in order
    assert "fits" in plan.describe() and 'device_map="auto"' in plan.describe()

    small = bf16.fits("1x12GB", cpu="2GB")
    assert not small.fits and small.offloaded_bytes > 0
    assert {d.device for d in small.devices if d.blocks} == {"gpu0", "cpu", "disk"}
    assert "offload_folder" in small.describe()

    int8 = estimate(CONFIGS / "otter-9b.json", dtype="bf16", quantization="int8")
    int4 = estimate(CONFIGS / "otter-9b.json", dtype="bf16", quantization="int4")
    assert int4.total_bytes < int8.total_bytes < bf16.total_bytes
    assert int8.parts["vision"].bytes == bf16.parts["vision"].bytes  # vision tower never quantised
    assert int8.fits("1x12GB").fits


def test_parse_devices():
    assert parse_devices("2x24GB") == [24 * 10**9] * 2
    assert parse_devices("24GB,12GB") == [24 * 10**9, 12 * 10**9]
    assert parse_devices("1x80GiB") == [80 * 2**30]
    for bad in ("", "2x", "fast", "0GB"):
        with pytest.raises(ValueError, match="devices"):
            parse_devices(bad)


def test_estimate_command_prints_the_table_and_the_plan(capsys, tmp_path):
    argv = ["--config", str(CONFIGS / "otter-9b.json"), "--dtype", "bf16", "--devices", "2x24GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("vision tower", "perceiver", "gated cross-attention", "LM decoder layers", "total", "fits", "gpu1"):
        assert text in out
    assert main([*argv, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["fits"] is True and payload["total_params"] == sum(p["params"] for p in payload["parts"].values())
    assert main(["--config", os.fspath(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("otter estimate: error: config: no such file")
