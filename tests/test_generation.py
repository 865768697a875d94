import json
import threading

import pytest
import torch
from conftest import CONFIGS, EOC, MEDIA, TINY_TOKENIZER, left_pad, prompt, random_images, tiny_config, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
from flamingo.modeling_flamingo import compute_media_positions
from otter import OtterConfig, OtterForConditionalGeneration, OtterProcessor

NEW_TOKENS = 8


def greedy(model, ids, images, mask=None, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False} | kwargs
    return model.generate(input_ids=ids, vision_x=images, attention_mask=mask, **kwargs)


def full_forward_greedy(model, ids, images, steps=NEW_TOKENS):
    """Greedy decoding by full forward passes over prompt + generated text: the training semantics. (Positions
    are passed explicitly because a random model may generate `<image>` tokens, which see no image.)"""
    media = model.get_media_features(images)
    attend_previous = model.config.only_attend_previous
    for _ in range(steps):
        positions = compute_media_positions(ids, MEDIA, attend_previous)
        with torch.no_grad():
            logits = model(input_ids=ids, media=media, media_positions=positions).logits[:, -1]
        logits[:, model.generation_config.eos_token_id] = -torch.inf  # as min_new_tokens does in greedy()
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


CASES = {
    "one image": ([prompt("img", 6)], 1),
    "three images": ([prompt("img", 3, "eoc", "img", 2, "eoc", "img", 4)], 3),
    "padded batch of three": (
        [prompt("img", 9, seed=1), prompt("img", 3, "eoc", "img", 2, seed=2), prompt(2, "img", 5, seed=3)],
        2,
    ),
}


@pytest.mark.parametrize("attend_previous", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_cached_generation_equals_uncached(case, attend_previous):
    rows, num_images = CASES[case]
    model = tiny_model("otter", only_attend_previous=attend_previous, seed=1)
    ids, mask = left_pad(rows)
    images = random_images(len(rows), num_images, seed=2)
    outputs = {}
    for use_cache in (True, False):
        outputs[use_cache] = greedy(
            model, ids, images, mask, use_cache=use_cache, output_logits=True, return_dict_in_generate=True
        )
    assert torch.equal(outputs[True].sequences, outputs[False].sequences)
    assert outputs[True].sequences.shape[1] == ids.shape[1] + NEW_TOKENS
    for step_cached, step_full in zip(outputs[True].logits, outputs[False].logits, strict=True):
        torch.testing.assert_close(step_cached, step_full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attend_previous", [True, False])
def test_generated_tokens_attend_as_in_a_full_forward_pass(attend_previous):
    model = tiny_model("flamingo", only_attend_previous=attend_previous, seed=3)
    ids = torch.tensor([prompt("img", 3, "eoc", "img", 4)])
    images = random_images(1, 2, seed=4)
    torch.testing.assert_close(greedy(model, ids, images), full_forward_greedy(model, ids, images), atol=0, rtol=0)


def test_generated_tokens_see_the_last_image():
    # The reference's cached generate gave new tokens no image at all; with only_attend_previous=True they attend
    # to the last image. The prompt's first <image> token is masked out, so the first image could only reach the
    # generated tokens through their own cross-attention: it must not, and the last image must.
    model = tiny_model("otter", seed=5, only_attend_previous=True)
    ids = torch.tensor([prompt("img", "img", 4)])
    mask = torch.ones_like(ids)
    mask[0, 1] = 0  # the first <image>, the only prompt token that sees the first image
    first, last, other = random_images(1, 1, seed=1), random_images(1, 1, seed=2), random_images(1, 1, seed=3)

    def step_logits(images):
        out = greedy(model, ids, images, mask, output_logits=True, return_dict_in_generate=True)
        positions = compute_media_positions(out.sequences, MEDIA, attend_previous=True)
        assert (positions[0, ids.shape[1] :] == 2).all()
        return torch.stack(out.logits)

    reference = step_logits(torch.cat([first, last], dim=1))
    torch.testing.assert_close(step_logits(torch.cat([other, last], dim=1)), reference, atol=1e-6, rtol=0)
    changed = step_logits(torch.cat([first, other], dim=1))
    assert (changed[0] - reference[0]).abs().max() > 1e-3  # the first generated token already sees the last image


def test_padded_batch_generates_what_each_prompt_generates_alone():
    rows, _ = CASES["padded batch of three"]
    model = tiny_model("otter", seed=6)
    images = random_images(3, 2, seed=7)
    images[0, 1] = 0
    images[2, 1] = 0
    ids, mask = left_pad(rows)
    batched = greedy(model, ids, images, mask)
    for i, row in enumerate(rows):
        alone = greedy(model, torch.tensor([row]), images[i : i + 1, : 1 + (i == 1)])
        assert batched[i, -NEW_TOKENS:].tolist() == alone[0, -NEW_TOKENS:].tolist()


def test_different_images_give_different_continuations():
    model = tiny_model("otter", seed=8)
    ids = torch.tensor([prompt("img", 5)])
    continuations = {tuple(greedy(model, ids, random_images(1, 1, seed=s))[0, -NEW_TOKENS:].tolist()) for s in range(4)}
    assert len(continuations) > 1


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3, "num_return_sequences": 2}, {"use_cache": False}])
def test_vision_perceiver_and_media_projections_run_once_per_generate(kwargs):
    model = tiny_model("otter", seed=9)
    vision_calls = count_calls(model.vision_encoder)
    perceiver_calls = count_calls(model.perceiver)
    blocks = [layer.gated_cross_attn_layer for layer in model.decoder_layers() if layer.gated_cross_attn_layer]
    projection_calls = [count_calls(block.attn.to_kv) for block in blocks]
    ids, mask = left_pad([prompt("img", 4, "img", 3, seed=1), prompt("img", 6, seed=2)])
    out = greedy(model, ids, random_images(2, 2), mask, **kwargs)
    assert len(vision_calls) == 1 and len(perceiver_calls) == 1
    expected_projections = NEW_TOKENS if kwargs.get("use_cache") is False else 1
    assert [len(calls) for calls in projection_calls] == [expected_projections] * len(blocks)
    assert out.shape[0] == 2 * kwargs.get("num_return_sequences", 1)


def test_beam_search_returns_the_requested_rows():
    model = tiny_model("otter", seed=10)
    ids = torch.tensor([prompt("img", 5)])
    out = greedy(
        model,
        ids,
        random_images(1, 1),
        num_beams=3,
        num_return_sequences=3,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape == (3, ids.shape[1] + NEW_TOKENS)
    assert out.sequences_scores.shape == (3,)
    assert (out.sequences_scores[:-1] >= out.sequences_scores[1:]).all()


def test_sampling_and_constraints():
    model = tiny_model("otter", seed=11)
    ids = torch.tensor([prompt("img", 5)])
    images = random_images(1, 1)
    torch.manual_seed(0)
    first = greedy(model, ids, images, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(0)
    assert torch.equal(first, greedy(model, ids, images, do_sample=True, temperature=0.7, top_k=20, top_p=0.9))
    banned = greedy(model, ids, images)[0, ids.shape[1]].item()
    constrained = greedy(model, ids, images, bad_words_ids=[[banned]], no_repeat_ngram_size=2)
    new = constrained[0, ids.shape[1] :].tolist()
    assert banned not in new
    bigrams = list(zip(new, new[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))


def test_temperature_and_top_k_shape_the_sampled_distribution():
    model = tiny_model("otter", seed=11)
    ids = torch.tensor([prompt("img", 5)])
    images = random_images(1, 1)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        vision_x=images,
        do_sample=True,
        temperature=2.0,
        top_k=3,
        top_p=1.0,
        max_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits, strict=True)):
        top = (logits / 2.0).topk(3, dim=-1).indices[0]
        kept = torch.isfinite(scores[0]).nonzero()[:, 0]
        assert sorted(kept.tolist()) == sorted(top.tolist())  # top_k=3: only the 3 best tokens survive
        torch.testing.assert_close(scores[0, kept], logits[0, kept] / 2.0)  # temperature=2 divides the logits
        assert out.sequences[0, ids.shape[1] + step].item() in top.tolist()
    # top_k=1 leaves sampling no choice: it is greedy decoding
    assert torch.equal(greedy(model, ids, images, do_sample=True, top_k=1), greedy(model, ids, images))


def test_hot_sampling_depends_on_the_seed_and_returns_the_requested_rows():
    model = tiny_model("otter", seed=11)
    ids, mask = left_pad([prompt("img", 5, seed=1), prompt("img", 3, seed=2)])
    images = random_images(2, 1)
    outputs = []
    for seed in range(3):
        torch.manual_seed(seed)
        outputs.append(greedy(model, ids, images, mask, do_sample=True, temperature=50.0, top_k=0))
    assert len({tuple(out[0, -NEW_TOKENS:].tolist()) for out in outputs}) == 3

    torch.manual_seed(0)
    out = greedy(model, ids, images, mask, do_sample=True, temperature=50.0, top_k=0, num_return_sequences=3)
    assert out.shape == (2 * 3, ids.shape[1] + NEW_TOKENS)
    for row in range(6):  # the rows of a prompt come together, each continuing that prompt
        assert torch.equal(out[row, : ids.shape[1]], ids[row // 3])
    assert len({tuple(row[-NEW_TOKENS:].tolist()) for row in out[:3]}) > 1


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria():
    model = tiny_model("otter", seed=12)
    ids = torch.tensor([prompt("img", 5)])
    out = model.generate(
        input_ids=ids,
        vision_x=random_images(1, 1),
        max_new_tokens=20,
        stopping_criteria=StoppingCriteriaList([StopAfter(ids.shape[1] + 3)]),
    )
    assert out.shape[1] == ids.shape[1] + 3


def test_generation_stops_at_end_of_chunk_and_the_config_is_saved(tmp_path):
    model = tiny_model("otter", seed=13)
    assert model.generation_config.eos_token_id == [EOC, 2]
    # The tiny configs' text_config.pad_token_id is the tiny tokenizer's <PAD>.
    assert model.generation_config.pad_token_id == AutoTokenizer.from_pretrained(TINY_TOKENIZER).pad_token_id
    steps = []

    def prefer_end_of_chunk(module, inputs, output):
        steps.append(1)
        if len(steps) == 3:  # the third decoding step picks <|endofchunk|>
            output[..., EOC] += 1e4
        return output

    model.lang_encoder.lm_head.register_forward_hook(prefer_end_of_chunk)
    ids = torch.tensor([prompt("img", 5)])
    out = model.generate(input_ids=ids, vision_x=random_images(1, 1), max_new_tokens=20)
    assert out.shape[1] == ids.shape[1] + 3 and out[0, -1] == EOC
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert reloaded.generation_config.pad_token_id == model.generation_config.pad_token_id


def llama_like_tokenizer(num_words: int, pad_token: str | None = None) -> PreTrainedTokenizerFast:
    """<unk> 0, <s> 1, </s> 2 (EOS), an optional pad token 3, then plain words; none of the family's tokens."""
    specials = ["<unk>", "<s>", "</s>", *([pad_token] if pad_token else [])]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": len(vocab) + i for i in range(num_words - len(vocab))})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=pad_token
    )


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_resizing_for_a_tokenizer_updates_the_generation_config(family, tmp_path):
    processor_class = OtterProcessor if family == "otter" else FlamingoProcessor
    processor = processor_class(tokenizer=llama_like_tokenizer(128))  # adds the family's tokens and <PAD> at 128+
    model = tiny_model(family, seed=16)
    assert model.generation_config.eos_token_id == [EOC, 2]
    processor.resize_model_embeddings(model)
    tokenizer = processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids("<PAD>")
    assert tokenizer.pad_token_id == pad == len(tokenizer) - 1 and processor.endofchunk_token_id == 128
    # The stale <|endofchunk|> (3) is gone; the tokenizer's EOS (2) and <PAD> are used.
    assert model.generation_config.eos_token_id == [128, tokenizer.eos_token_id]
    assert model.generation_config.pad_token_id == pad == model.config.pad_token_id

    # In a batch, the row that stops first (at the new <|endofchunk|>) is padded with <PAD>.
    steps = []

    def first_row_ends_chunk(module, inputs, output):
        steps.append(1)
        if len(steps) == 1:
            output[0, -1, 128] += 1e4
        return output

    model.lang_encoder.lm_head.register_forward_hook(first_row_ends_chunk)
    ids, mask = left_pad([[1, 129, 10, 11], [1, 129, 12]], pad_id=pad)
    out = model.generate(input_ids=ids, vision_x=random_images(2, 1), attention_mask=mask, max_new_tokens=4)
    assert out.shape[1] == ids.shape[1] + 4 and out[0, ids.shape[1]] == 128
    assert (out[0, ids.shape[1] + 1 :] == pad).all() and (out[1, ids.shape[1] + 1 :] != pad).all()

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [128, tokenizer.eos_token_id] and saved["pad_token_id"] == pad
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.generation_config.eos_token_id == [128, tokenizer.eos_token_id]
    assert reloaded.generation_config.pad_token_id == reloaded.config.pad_token_id == pad


def test_the_tokenizers_own_pad_wins_over_the_published_layout():
    # The tokenizer has a pad (3), so Otter adds no <PAD>; padding the rows to a multiple of 4 makes the row after
    # <answer> the last one, as in the published layout, but it is only a padding row.
    processor = OtterProcessor(tokenizer=llama_like_tokenizer(128, pad_token="<pad>"))
    model = tiny_model("otter", seed=17)
    processor.resize_model_embeddings(model, pad_to_multiple_of=4)
    assert processor.added_tokens == ["<|endofchunk|>", "<image>", "<answer>"]
    assert model.config.text_config.vocab_size == processor.answer_token_id + 2 == 132
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id == 3
    assert model.generation_config.eos_token_id == [128, 2]


@pytest.mark.parametrize(("vocab_size", "pad"), [(32004, 32003), (32000, None)])
def test_published_otter_config_pads_with_pad_and_stops_at_end_of_chunk(vocab_size, pad):
    # configs/otter-9b.json as published; saved releases carry the resized vocabulary (32004 rows: <|endofchunk|>
    # 32000, <image> 32001, <answer> 32002, <PAD> 32003). The template's 32000 rows have no <PAD> row, and an id
    # the embeddings lack must never be fed back as padding.
    config = OtterConfig.from_json_file(str(CONFIGS / "otter-9b.json"))
    config.text_config.vocab_size = vocab_size
    with torch.device("meta"):
        model = OtterForConditionalGeneration(config)
    assert model.generation_config.eos_token_id == [32000, 2]
    assert model.generation_config.pad_token_id == pad


def test_openflamingo_config_keeps_the_lms_pad():
    # Flamingo configs name no <PAD>: the LM's pad (none for the LLaMA template) until a processor records one.
    config = FlamingoConfig.from_json_file(str(CONFIGS / "openflamingo-9b.json"))
    config.text_config.vocab_size = 32003
    with torch.device("meta"):
        model = FlamingoForConditionalGeneration(config)
    assert model.generation_config.eos_token_id == [32000, 2]
    assert model.generation_config.pad_token_id is None


def test_a_release_with_llamas_generation_config_pads_with_otters_pad(tmp_path):
    # A release in the published layout (<answer> 5, <PAD> 6 = the last row) that ships LLaMA's generation config:
    # pad 0 (<unk>) and EOS 2 only.
    config = tiny_config("otter")
    config.text_config.vocab_size = config.answer_token_id + 2
    OtterForConditionalGeneration(config).save_pretrained(tmp_path)
    llama = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.28.0"}
    (tmp_path / "generation_config.json").write_text(json.dumps(llama))
    model = OtterForConditionalGeneration.from_pretrained(tmp_path)
    assert model.generation_config.eos_token_id == [EOC, 2]
    assert model.generation_config.pad_token_id == config.answer_token_id + 1 == 6


def test_streamer_yields_the_generated_text():
    model = tiny_model("otter", seed=14)
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    ids = torch.tensor([prompt("img", 5)])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def run():
        result["ids"] = greedy(model, ids, random_images(1, 1), streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    expected = tokenizer.decode(result["ids"][0, ids.shape[1] :], skip_special_tokens=True)
    assert streamed.strip() == expected.strip()


def test_video_generation():
    model = tiny_model("otter", seed=15)
    ids = torch.tensor([prompt("img", 5)])
    video = random_images(1, 1, frames=4)
    cached = greedy(model, ids, video)
    assert torch.equal(cached, full_forward_greedy(model, ids, video))


def test_more_image_tokens_than_images_names_both_counts():
    model = tiny_model("otter")
    ids = torch.tensor([prompt("img", 2, "img", 2, "img", 2)])
    with pytest.raises(ValueError, match="3 <image> tokens but vision_x holds only 2 images"):
        model.generate(input_ids=ids, vision_x=random_images(1, 2), max_new_tokens=2)


def test_prompt_without_image_token_is_allowed():
    model = tiny_model("otter")
    ids = torch.tensor([prompt(6)])
    first = greedy(model, ids, random_images(1, 1, seed=1))
    # No <image> token: no text attends to the image, so the image cannot change the answer.
    assert torch.equal(first, greedy(model, ids, random_images(1, 1, seed=2)))
    assert torch.equal(first, greedy(model, ids, None))
