"""FlamingoProcessor / OtterProcessor: tokens, shapes, padding, pixels, errors, Otter prompts, save/load."""

import logging
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoTokenizer, CLIPImageProcessorPil, PreTrainedTokenizerFast  # noqa: E402
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402

from flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor  # noqa: E402
from otter import OtterConfig, OtterForConditionalGeneration, OtterProcessor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "tiny-tokenizer"
PAD, EOC, MEDIA, ANSWER = 0, 3, 4, 5


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


def tiny_image_processor():
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def image(seed: int, height: int = 40, width: int = 48) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def clip_pixels(*images) -> torch.Tensor:
    return tiny_image_processor()(list(images), return_tensors="pt")["pixel_values"]


@pytest.fixture
def processor():
    return FlamingoProcessor(tiny_image_processor(), tiny_tokenizer())


@pytest.fixture
def otter_processor():
    return OtterProcessor(tiny_image_processor(), tiny_tokenizer())


def word_tokenizer(num_words: int) -> PreTrainedTokenizerFast:
    """A tokenizer with `num_words` plain words, none of the family's special tokens and no pad token."""
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(num_words - 1)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


# ----- construction and special tokens ---------------------------------------------------------------------------


def test_default_image_processor_is_otters_inference_preprocessing():
    image_processor = FlamingoProcessor(tokenizer=tiny_tokenizer()).image_processor
    assert image_processor.size == {"shortest_edge": 224}
    assert image_processor.crop_size == {"height": 224, "width": 224}
    assert image_processor.resample == PILImageResampling.BICUBIC
    assert image_processor.do_resize and image_processor.do_center_crop
    assert image_processor.do_rescale and image_processor.rescale_factor == pytest.approx(1 / 255)
    assert image_processor.do_normalize
    assert list(image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073] == list(OPENAI_CLIP_MEAN)
    assert list(image_processor.image_std) == [0.26862954, 0.26130258, 0.27577711] == list(OPENAI_CLIP_STD)


def test_a_tokenizer_is_required():
    with pytest.raises(ValueError, match="a tokenizer is required"):
        FlamingoProcessor(tiny_image_processor())


def test_token_ids_of_the_tiny_tokenizer(processor, otter_processor):
    assert (processor.media_token_id, processor.endofchunk_token_id) == (MEDIA, EOC)
    assert processor.image_token_id == MEDIA
    assert processor.added_tokens == []
    assert len(processor.tokenizer) == 128
    assert otter_processor.answer_token_id == ANSWER
    assert otter_processor.special_token_ids == {"media_token_id": 4, "endofchunk_token_id": 3, "answer_token_id": 5}
    assert processor.model_input_names == ["input_ids", "attention_mask", "vision_x"]


def test_missing_special_tokens_are_added_in_the_published_order(caplog):
    with caplog.at_level(logging.WARNING):
        processor = FlamingoProcessor(tiny_image_processor(), word_tokenizer(10))
    assert processor.added_tokens == ["<|endofchunk|>", "<image>", "<PAD>"]
    assert (processor.endofchunk_token_id, processor.media_token_id) == (10, 11)
    assert processor.tokenizer.pad_token == "<PAD>" and processor.tokenizer.pad_token_id == 12
    assert {"<|endofchunk|>", "<image>", "<PAD>"} <= set(processor.tokenizer.all_special_tokens)
    assert "resize the model's token embeddings" in caplog.text

    otter = OtterProcessor(tiny_image_processor(), word_tokenizer(10))
    assert otter.added_tokens == ["<|endofchunk|>", "<image>", "<answer>", "<PAD>"]
    assert (otter.endofchunk_token_id, otter.media_token_id, otter.answer_token_id) == (10, 11, 12)
    assert otter.tokenizer.pad_token_id == 13
    # special: never split, and dropped by skip_special_tokens
    ids = otter.tokenizer("w1<image>w2<answer>w3")["input_ids"]
    assert ids == [2, 11, 3, 12, 4]
    assert otter.tokenizer.decode(ids, skip_special_tokens=True).split() == ["w1", "w2", "w3"]


@pytest.mark.parametrize("family", ["flamingo", "otter"])
def test_resize_model_embeddings(family):
    processor_class = OtterProcessor if family == "otter" else FlamingoProcessor
    processor = processor_class(tiny_image_processor(), word_tokenizer(128))  # 128 words + the added tokens
    config_class = OtterConfig if family == "otter" else FlamingoConfig
    model_class = OtterForConditionalGeneration if family == "otter" else FlamingoForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config_class.from_json_file(str(REPO_ROOT / "configs" / f"{family}-tiny.json"))).eval()
    assert model.get_input_embeddings().weight.shape[0] == 128 < len(processor.tokenizer)

    processor.resize_model_embeddings(model)
    rows = len(processor.tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.media_token_id == processor.media_token_id == 129
    assert model.config.endofchunk_token_id == processor.endofchunk_token_id == 128
    if family == "otter":
        assert model.config.answer_token_id == processor.answer_token_id == 130

    inputs = processor(text="<image>w1 w2<|endofchunk|>", images=[image(0)])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 4, rows)
    processor.resize_model_embeddings(model)  # already large enough: unchanged
    assert model.get_input_embeddings().weight.shape[0] == rows


# ----- shapes, padding, pixels -----------------------------------------------------------------------------------


def test_batch_shapes_and_zero_image_padding(processor):
    images = [[image(0), image(1)], [image(2)]]
    inputs = processor(text=["<image>A cat.<|endofchunk|><image>A", "<image>A dog"], images=images)
    assert set(inputs) == {"input_ids", "attention_mask", "vision_x"}
    assert inputs["vision_x"].shape == (2, 2, 1, 3, 32, 32)
    assert inputs["vision_x"].dtype == torch.float32
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape
    assert inputs["input_ids"].dtype == torch.long
    expected = clip_pixels(image(0), image(1), image(2))
    assert torch.equal(inputs["vision_x"][0, 0, 0], expected[0])
    assert torch.equal(inputs["vision_x"][0, 1, 0], expected[1])
    assert torch.equal(inputs["vision_x"][1, 0, 0], expected[2])
    assert torch.count_nonzero(inputs["vision_x"][1, 1]) == 0  # the padding image is all zeros


def test_left_padding(processor):
    prompts = ["<image>A cat.<|endofchunk|><image>A red circle", "<image>dog"]
    inputs = processor(text=prompts, images=[[image(0), image(1)], [image(2)]])
    alone = [processor.tokenizer(prompt)["input_ids"] for prompt in prompts]
    width = inputs["input_ids"].shape[1]
    assert width == max(len(ids) for ids in alone)
    for row, ids in enumerate(alone):
        pad = width - len(ids)
        assert inputs["input_ids"][row, pad:].tolist() == ids
        assert inputs["input_ids"][row, :pad].tolist() == [PAD] * pad
        assert inputs["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
    assert inputs["attention_mask"][1, 0] == 0  # the short prompt is padded on the left


def test_left_padding_even_with_a_right_padding_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    processor = FlamingoProcessor(tiny_image_processor(), tokenizer)
    inputs = processor(text=["<image>A red circle", "<image>A"], images=[[image(0)], [image(1)]])
    assert inputs["attention_mask"][1, 0] == 0 and inputs["attention_mask"][1, -1] == 1
    right = processor(text=["<image>A red circle", "<image>A"], images=[[image(0)], [image(1)]], padding_side="right")
    assert right["attention_mask"][1, 0] == 1 and right["attention_mask"][1, -1] == 0


def test_single_prompt_forms(processor):
    flat = processor(text="<image>A<|endofchunk|><image>B", images=[image(0), image(1)])
    nested = processor(text=["<image>A<|endofchunk|><image>B"], images=[[image(0), image(1)]])
    assert flat["vision_x"].shape == (1, 2, 1, 3, 32, 32)
    for key in flat:
        assert torch.equal(flat[key], nested[key])
    one = processor(text="<image>A", images=image(0))
    assert one["vision_x"].shape == (1, 1, 1, 3, 32, 32)
    array = processor(text="<image>A", images=[np.asarray(image(0))])
    assert torch.equal(array["vision_x"], one["vision_x"])


def test_pixel_normalisation_equals_clip_image_processor(processor):
    inputs = processor(text="<image>A", images=[image(3, 57, 41)])
    direct = tiny_image_processor()(image(3, 57, 41), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(inputs["vision_x"][0, 0, 0], direct)
    # An image already 32x32 is only rescaled and normalised: (x / 255 - mean) / std, channel first.
    pixels = np.random.RandomState(7).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    inputs = processor(text="<image>A", images=[Image.fromarray(pixels)])
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    expected = torch.from_numpy(((pixels / 255.0 - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(inputs["vision_x"][0, 0, 0], expected, atol=1e-5, rtol=0)


def test_video_layout(processor):
    frames = [[image(0), image(1), image(2)], [image(3), image(4), image(5)]]
    inputs = processor(text=["<image>User: a", "<image>User: b c"], videos=frames)
    assert inputs["vision_x"].shape == (2, 1, 3, 3, 32, 32)
    expected = clip_pixels(*frames[0], *frames[1])
    assert torch.equal(inputs["vision_x"][0, 0], expected[:3])
    assert torch.equal(inputs["vision_x"][1, 0, 2], expected[5])

    single = processor(text="<image>User: a", videos=frames[0])
    assert single["vision_x"].shape == (1, 1, 3, 3, 32, 32)
    assert torch.equal(single["vision_x"][0], inputs["vision_x"][0])
    stack = np.stack([np.asarray(frame) for frame in frames[0]])  # one 4-d (F, H, W, C) array
    assert torch.equal(processor(text="<image>User: a", videos=stack)["vision_x"], single["vision_x"])
    channels_first = torch.from_numpy(stack).permute(0, 3, 1, 2)  # one 4-d (F, C, H, W) tensor
    from_tensor = processor(text="<image>User: a", videos=channels_first)["vision_x"]
    torch.testing.assert_close(from_tensor, single["vision_x"], atol=1e-5, rtol=0)


def test_images_only_and_text_only(processor):
    only_images = processor(images=[[image(0)], [image(1), image(2)]])
    assert set(only_images) == {"vision_x"} and only_images["vision_x"].shape == (2, 2, 1, 3, 32, 32)
    only_text = processor(text=["A cat", "A red dog"])
    assert set(only_text) == {"input_ids", "attention_mask"}
    no_images_at_all = processor(text=["A cat", "A dog"], images=[[], []])
    assert "vision_x" not in no_images_at_all
    with_none = processor(text=["<image>A cat", "A dog"], images=[[image(0)], None])  # None: no images
    assert with_none["vision_x"].shape == (2, 1, 1, 3, 32, 32)
    assert torch.count_nonzero(with_none["vision_x"][1]) == 0


def test_return_tensors_np(processor):
    inputs = processor(text=["<image>A", "<image>B c"], images=[[image(0)], [image(1)]], return_tensors="np")
    assert isinstance(inputs["input_ids"], np.ndarray) and isinstance(inputs["vision_x"], np.ndarray)
    assert inputs["vision_x"].shape == (2, 1, 1, 3, 32, 32)


def test_fewer_media_tokens_than_images_is_allowed(processor, caplog):
    with caplog.at_level(logging.WARNING):
        inputs = processor(text="<image>A cat", images=[image(0), image(1)])
    assert inputs["vision_x"].shape == (1, 2, 1, 3, 32, 32)
    assert (inputs["input_ids"] == MEDIA).sum() == 1


def test_tokenizer_kwargs_pass_through(processor):
    text = ["<image>A red circle on a white background"]
    inputs = processor(text=text, images=[[image(0)]], max_length=4, truncation=True)
    assert inputs["input_ids"].shape == (1, 4)
    assert processor(text="A", add_special_tokens=False)["input_ids"].tolist() == [
        processor.tokenizer("A", add_special_tokens=False)["input_ids"]
    ]


# ----- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p(text="<image>A<image>B", images=[image(0)]), r"prompt 0 has 2 <image> token\(s\) but 1 image"),
        (
            lambda p: p(text=["<image>A", "<image><image>B"], images=[[image(0), image(1)], [image(2)]]),
            "prompt 1 has 2",
        ),
        (lambda p: p(text="<image>A"), r"prompt 0 has 1 <image> token\(s\) but 0 image"),
        (lambda p: p(text=["A", "B"], images=[[image(0)]]), r"expected one list per prompt \(2 in all\), got 1"),
        (lambda p: p(text=["A"], images=[[image(0)], [image(1)]]), r"expected one list per prompt \(1 in all\), got 2"),
        (lambda p: p(text=["A", "B"], images=[image(0), image(1)]), "got a flat list of 2 items"),
        (lambda p: p(text=["A", "B"], videos=[[image(0)]]), r"videos: expected one list per prompt \(2 in all\)"),
        (lambda p: p(text="A", images=["cat.jpg"]), r"images\[0\]\[0\]: expected an image .* got str"),
        (lambda p: p(text=["A", "B"], images=[[image(0)], [image(1), 3]]), r"images\[1\]\[1\]: .*got int"),
        (lambda p: p(text="A", images=[np.zeros(5)]), r"got ndarray of shape \(5,\)"),
        (lambda p: p(text="A", images=[np.zeros((40, 48))]), r"3-d HWC/CHW .* got ndarray of shape \(40, 48\)"),
        (lambda p: p(text="A", images=[[image(0)], image(1)]), "got a mix"),
        (lambda p: p(text="A", images={"a": image(0)}), "images: expected a list .* got dict"),
        (lambda p: p(text="A", videos=[["frame"]]), r"videos\[0\]\[0\]: expected an image"),
        (lambda p: p(text=["A", "B"], videos=[[image(0)], [image(1), image(2)]]), r"same number of frames.*\[1, 2\]"),
        (lambda p: p(text="A", videos=[[]]), "expected at least one frame"),
        (lambda p: p(text="<image>A", images=[image(0)], videos=[image(1)]), "either images or videos, got both"),
        (lambda p: p(), "expected text, images or videos"),
        (lambda p: p(text=["A", 3]), r"text\[1\]: expected a string, got int"),
        (lambda p: p(text=[]), "text: expected a string or a non-empty list"),
    ],
)
def test_errors_say_expected_and_got(processor, call, message):
    with pytest.raises(ValueError, match=message):
        call(processor)


# ----- decode ----------------------------------------------------------------------------------------------------


def test_decode_passes_through(processor):
    ids = processor(text=["<image>A red circle", "<image>B"], images=[[image(0)], [image(1)]])["input_ids"]
    assert processor.batch_decode(ids) == processor.tokenizer.batch_decode(ids)
    assert processor.batch_decode(ids, skip_special_tokens=True) == processor.tokenizer.batch_decode(
        ids, skip_special_tokens=True
    )
    assert processor.decode(ids[0]) == processor.tokenizer.decode(ids[0])


# ----- Otter prompts ---------------------------------------------------------------------------------------------


def test_otter_prompt_literal_format():
    # reference §5: "<image>User: {q} GPT:<answer>", in-context "<image>User: … GPT:<answer> {a}<|endofchunk|>"
    assert OtterProcessor.build_prompt("What is in the image?") == "<image>User: What is in the image? GPT:<answer>"
    prompt = OtterProcessor.build_prompt(
        "What colour is the shape?",
        in_context=[("What is in the image?", "A red circle."), ("Describe it.", "A blue square.")],
    )
    assert prompt == (
        "<image>User: What is in the image? GPT:<answer> A red circle.<|endofchunk|>"
        "<image>User: Describe it. GPT:<answer> A blue square.<|endofchunk|>"
        "<image>User: What colour is the shape? GPT:<answer>"
    )
    assert OtterProcessor.build_prompt("  spaced  ", in_context=[(" q ", " a ")]) == (
        "<image>User: q GPT:<answer> a<|endofchunk|><image>User: spaced GPT:<answer>"
    )


def test_otter_video_prompt_has_one_media_token():
    assert OtterProcessor.build_video_prompt("Describe the video.") == "<image>User: Describe the video. GPT:<answer>"
    prompt = OtterProcessor.build_video_prompt(
        "Where does it move?", in_context=[("Describe the video.", "A green square moves.")]
    )
    assert prompt == (
        "<image>User: Describe the video. GPT:<answer> A green square moves.<|endofchunk|>"
        "User: Where does it move? GPT:<answer>"
    )
    assert prompt.count("<image>") == 1


def test_otter_prompt_tokens_and_processor_call(otter_processor):
    prompt = otter_processor.build_prompt("What is in the image?", in_context=[("What colour?", "Red.")])
    inputs = otter_processor(text=prompt, images=[image(0), image(1)])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(MEDIA) == 2 and ids.count(ANSWER) == 2 and ids.count(EOC) == 1
    assert ids[0] == MEDIA and ids[-1] == ANSWER
    assert ids.index(EOC) < ids.index(MEDIA, 1)  # the in-context chunk closes before the query's image
    video = otter_processor(text=otter_processor.build_video_prompt("Describe the video."), videos=[image(0), image(1)])
    assert video["vision_x"].shape == (1, 1, 2, 3, 32, 32)


@pytest.mark.parametrize(
    "in_context",
    ["not pairs", [("only a question",)], [("q", 3)], 5],
)
def test_otter_prompt_rejects_bad_examples(in_context):
    with pytest.raises(ValueError, match="in_context"):
        OtterProcessor.build_prompt("q", in_context=in_context)
    with pytest.raises(ValueError, match="question: expected a string"):
        OtterProcessor.build_prompt(None)


def test_decode_answer(otter_processor):
    decode = otter_processor.decode_answer
    assert decode("<image>User: What? GPT:<answer> A red circle.<|endofchunk|>") == "A red circle."
    # the last answer wins; in-context answers are skipped
    two = "<image>User: a GPT:<answer> first<|endofchunk|><image>User: b GPT:<answer>  second  <|endofchunk|>junk"
    assert decode(two) == "second"
    assert decode("User: q GPT:<answer> no end yet</s>") == "no end yet"  # no <|endofchunk|>: to the end
    assert decode("  plain text  ") == "plain text"  # no <answer>: the whole text
    assert decode("<answer><|endofchunk|>") == ""

    prompt = otter_processor.build_prompt("What is in the image?")
    generated = otter_processor.tokenizer(prompt + " A red circle.<|endofchunk|></s>")["input_ids"]
    assert decode(generated) == "A red circle."
    assert decode(torch.tensor(generated)) == "A red circle."
    assert decode(np.array(generated)) == "A red circle."
    assert decode([np.int64(i) for i in generated]) == "A red circle."

    batch = otter_processor(
        text=[prompt + " A red circle.<|endofchunk|>", prompt + " The shape is blue.<|endofchunk|><PAD>"],
        images=[[image(0)], [image(1)]],
    )["input_ids"]
    assert batch[0, 0] == PAD  # left padding is stripped as a special token
    assert decode(batch) == ["A red circle.", "The shape is blue."]
    assert decode(batch.tolist()) == ["A red circle.", "The shape is blue."]
    assert decode(["<answer> x<|endofchunk|>", "<answer>y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="decode_answer: expected"):
        decode(3.5)
    with pytest.raises(ValueError, match="decode_answer: expected"):
        decode(np.float32(3.5))


# ----- save / load -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processor_class", [FlamingoProcessor, OtterProcessor])
def test_save_load_round_trip(tmp_path, processor_class):
    processor = processor_class(tiny_image_processor(), tiny_tokenizer())
    processor.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= files

    loaded = processor_class.from_pretrained(tmp_path)
    assert type(loaded) is processor_class
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.special_token_ids == processor.special_token_ids
    assert loaded.added_tokens == []
    first = "<image>A cat.<|endofchunk|><image>A"
    if processor_class is OtterProcessor:
        first = processor.build_prompt("What?", in_context=[("Which?", "Red.")])
    text = [first, "<image>B"]
    images = [[image(0), image(1)], [image(2)]]
    before, after = processor(text=text, images=images), loaded(text=text, images=images)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert loaded.batch_decode(after["input_ids"]) == processor.batch_decode(before["input_ids"])
