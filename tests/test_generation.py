import threading

import pytest
import torch
from conftest import EOC, MEDIA, TINY_TOKENIZER, left_pad, prompt, random_images, tiny_model
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from flamingo.modeling_flamingo import compute_media_positions

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
    # The reference's cached generate gave new tokens no image at all; here they attend to the last image, so
    # changing only the last image changes the logits of the generated tokens themselves.
    model = tiny_model("otter", seed=5)
    ids = torch.tensor([prompt("img", 4)])
    positions = compute_media_positions(greedy(model, ids, random_images(1, 1)), MEDIA, attend_previous=True)
    assert (positions[0, ids.shape[1] :] == 1).all()


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
    assert EOC in model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == 0
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
