"""The CUDA paths of the big-model features: the model on a GPU, device_map over GPU + CPU, bitsandbytes 8-/4-bit on
CUDA, half precision and flash-attention. Run with `pytest -m cuda` on a machine with a GPU; elsewhere they are
skipped (the README says when they last ran on one). Their CPU counterparts are in test_big_model.py."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import left_pad, prompt, random_images, tiny_model
from torch import nn
from transformers import BitsAndBytesConfig

from otter import OtterForConditionalGeneration

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 convolutions and matmuls would differ from the CPU by ~1e-3; the comparisons below are in true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def inputs():
    ids, mask = left_pad([prompt("img", 6, "eoc", "img", 4, seed=0), prompt("img", 3, "eoc", "img", 7, seed=1)])
    return ids, mask, random_images(2, 2, seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, inputs):
    """A tiny Otter with open gates, saved, with its CPU logits and greedy tokens."""
    model = tiny_model("otter", seed=0)
    path = tmp_path_factory.mktemp("tiny-otter")
    model.save_pretrained(path)
    ids, mask, images = inputs
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, vision_x=images).logits
    tokens = model.generate(input_ids=ids, attention_mask=mask, vision_x=images, max_new_tokens=6, do_sample=False)
    return str(path), logits, tokens


def run(model, inputs, device):
    ids, mask, images = (tensor.to(device) for tensor in inputs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, vision_x=images).logits
    tokens = model.generate(input_ids=ids, attention_mask=mask, vision_x=images, max_new_tokens=6, do_sample=False)
    return logits.float().cpu(), tokens.cpu()


def test_on_one_gpu_logits_and_tokens_match_the_cpu(checkpoint, inputs):
    path, reference_logits, reference_tokens = checkpoint
    model = OtterForConditionalGeneration.from_pretrained(path).to("cuda").eval()
    logits, tokens = run(model, inputs, "cuda")
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, reference_tokens)


def test_device_map_over_gpu_and_cpu_matches(checkpoint, inputs):
    path, reference_logits, reference_tokens = checkpoint
    model = OtterForConditionalGeneration.from_pretrained(path)
    layers = model.decoder_layers()
    # Room on the GPU for about half of the model: the rest of the decoder goes to the CPU.
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    sharded = OtterForConditionalGeneration.from_pretrained(
        path, device_map="auto", max_memory={0: budget, "cpu": 2**30}
    ).eval()
    devices = {str(device) for device in sharded.hf_device_map.values()}
    assert {"0", "cpu"} <= devices or {"cuda:0", "cpu"} <= devices, sharded.hf_device_map
    assert len(layers) == len(sharded.decoder_layers())
    logits, tokens = run(sharded, inputs, sharded.device)
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, reference_tokens)


@pytest.mark.parametrize(
    ("quantization_config", "linear_class"),
    [
        (BitsAndBytesConfig(load_in_8bit=True), bnb.nn.Linear8bitLt),
        (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16), bnb.nn.Linear4bit),
    ],
    ids=["int8", "int4"],
)
def test_bitsandbytes_on_cuda_quantises_only_the_lm_body(checkpoint, inputs, quantization_config, linear_class):
    path, _, _ = checkpoint
    model = OtterForConditionalGeneration.from_pretrained(
        path, quantization_config=quantization_config, device_map={"": 0}, dtype=torch.float16
    )
    quantised = [name for name, module in model.named_modules() if isinstance(module, linear_class)]
    assert quantised and all(".decoder_layer." in name for name in quantised)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, linear_class):
            assert ".decoder_layer." not in name, name
    for name, param in model.named_parameters():
        if name.startswith(("vision_encoder.", "perceiver.")) or name.endswith(("attn_gate", "ff_gate")):
            assert param.dtype == torch.float32, name
    _, tokens = run(model, inputs, "cuda")
    assert tokens.shape[0] == 2 and int(tokens.max()) < model.config.text_config.vocab_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_agrees_with_fp32(checkpoint, inputs, dtype):
    path, reference_logits, _ = checkpoint
    model = OtterForConditionalGeneration.from_pretrained(path, dtype=dtype).to("cuda").eval()
    logits, _ = run(model, inputs, "cuda")
    assert torch.isfinite(logits).all()
    mask = inputs[1].bool()
    agreement = (logits.argmax(-1) == reference_logits.argmax(-1))[mask].float().mean()
    assert agreement >= 0.9, f"top-1 agreement with fp32: {agreement:.1%}"


def test_flash_attention_2_agrees_with_sdpa(checkpoint, inputs):
    pytest.importorskip("flash_attn")
    path, _, _ = checkpoint
    results = {}
    for implementation in ("sdpa", "flash_attention_2"):
        model = OtterForConditionalGeneration.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation=implementation
        )
        results[implementation] = run(model.to("cuda").eval(), inputs, "cuda")[0]
    mask = inputs[1].bool()
    torch.testing.assert_close(results["flash_attention_2"][mask], results["sdpa"][mask], atol=3e-2, rtol=3e-2)


def test_xformers_agrees_with_sdpa_on_cuda(checkpoint, inputs, monkeypatch):
    pytest.importorskip("xformers.ops")
    from flamingo import modeling_flamingo

    path, reference_logits, _ = checkpoint
    model = OtterForConditionalGeneration.from_pretrained(path).to("cuda").eval()
    calls = []
    real = modeling_flamingo.xformers_ops().memory_efficient_attention
    monkeypatch.setattr(
        modeling_flamingo.xformers_ops(),
        "memory_efficient_attention",
        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs),
    )
    logits, _ = run(model, inputs, "cuda")
    assert calls, "xformers was not used on CUDA"
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
