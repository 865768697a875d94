"""Processor of the Flamingo family: a CLIP image processor and a tokenizer that knows `<image>` and
`<|endofchunk|>`. It turns prompts and their images (or video frames) into `input_ids`, `attention_mask` (left
padded) and `vision_x` of shape `(B, T_img, F, 3, H, W)`, the inputs of [`FlamingoForConditionalGeneration`]."""

from __future__ import annotations

from typing import Any

import torch
from transformers import BatchFeature, CLIPImageProcessorPil
from transformers.image_utils import is_valid_image
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)


def _describe(obj: Any) -> str:
    """A short name of what was passed, for error messages."""
    if hasattr(obj, "shape"):
        return f"{type(obj).__name__} of shape {tuple(obj.shape)}"
    return type(obj).__name__


def _is_image(obj: Any) -> bool:
    """One image: a PIL image, or a 3-d (HWC or CHW) numpy array or torch tensor."""
    if not is_valid_image(obj):
        return False
    return not hasattr(obj, "ndim") or obj.ndim == 3


def _is_frame_stack(obj: Any) -> bool:
    """A whole video as one 4-d array or tensor of frames, (F, H, W, C) or (F, C, H, W)."""
    return is_valid_image(obj) and hasattr(obj, "ndim") and obj.ndim == 4


def _check_image(obj: Any, where: str) -> None:
    if not _is_image(obj):
        raise ValueError(
            f"{where}: expected an image (PIL.Image.Image, or a 3-d HWC/CHW numpy array or torch tensor), "
            f"got {_describe(obj)}"
        )


class FlamingoProcessor(ProcessorMixin):
    r"""
    Builds the inputs of [`FlamingoForConditionalGeneration`] from prompts and images.

    Args:
        image_processor ([`CLIPImageProcessorPil`] or any image processor, *optional*): turns each image (or video
            frame) into a `(3, H, W)` tensor. Defaults to a default-constructed CLIP image processor (shortest edge
            224, bicubic, center crop 224, x1/255, OpenAI CLIP mean/std), which is what Otter runs at inference. The
            PIL backend is used because it needs no torchvision and matches the "slow" processor the published
            models were evaluated with.
        tokenizer ([`PreTrainedTokenizerBase`]): the language model's tokenizer. `<|endofchunk|>` and `<image>` are
            made special tokens of it (in place; a `<PAD>` pad token too when it has none, as OpenFlamingo does).
            When tokens had to be added, a warning says so and `added_tokens` lists them: the model's embeddings
            must then grow to `len(tokenizer)`, e.g. with [`~FlamingoProcessor.resize_model_embeddings`].

    The `i`-th `<image>` token of a prompt stands for the `i`-th image of that prompt. A prompt may come with more
    images than `<image>` tokens: the extra images are encoded but no text attends to them (a warning is logged
    once). A prompt with more `<image>` tokens than images is an error.
    """

    media_token = "<image>"
    endofchunk_token = "<|endofchunk|>"
    default_pad_token = "<PAD>"
    # transformers' generic multimodal helpers look for `image_token` / `image_token_id`.
    image_token = media_token

    valid_processor_kwargs = ProcessingKwargs

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__}: a tokenizer is required, got None")
        if image_processor is None:
            image_processor = CLIPImageProcessorPil()
        super().__init__(image_processor, tokenizer, **kwargs)
        self.added_tokens: list[str] = self._ensure_special_tokens()
        self.media_token_id: int = self.tokenizer.convert_tokens_to_ids(self.media_token)
        self.image_token_id: int = self.media_token_id
        self.endofchunk_token_id: int = self.tokenizer.convert_tokens_to_ids(self.endofchunk_token)

    # ----- special tokens ---------------------------------------------------------------------------------------

    @classmethod
    def required_special_tokens(cls) -> list[str]:
        """The special tokens the model family needs, in the order OpenFlamingo/Otter add them."""
        return [cls.endofchunk_token, cls.media_token]

    def _ensure_special_tokens(self) -> list[str]:
        tokenizer = self.tokenizer
        special = set(tokenizer.all_special_tokens)
        missing = [token for token in self.required_special_tokens() if token not in special]
        size_before = len(tokenizer)
        vocab = tokenizer.get_vocab()
        added = [token for token in missing if token not in vocab]
        if missing:
            # Already-known tokens are only flagged special (never split, skipped when decoding); unknown ones get
            # new ids at the end of the vocabulary.
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        if tokenizer.pad_token is None:
            if self.default_pad_token not in vocab:
                added.append(self.default_pad_token)
            tokenizer.add_special_tokens({"pad_token": self.default_pad_token})
        if len(tokenizer) > size_before:
            logger.warning(
                f"{type(self).__name__} added {len(tokenizer) - size_before} token(s) {added} to the tokenizer, which "
                f"now has {len(tokenizer)} entries: resize the model's token embeddings to match, e.g. "
                "`processor.resize_model_embeddings(model)`."
            )
        return added

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Ids of the family's special tokens under the names of the config fields that hold them."""
        return {"media_token_id": self.media_token_id, "endofchunk_token_id": self.endofchunk_token_id}

    def resize_model_embeddings(self, model, pad_to_multiple_of: int | None = None, mean_resizing: bool = True):
        """Make `model` fit this processor's tokenizer: grow its token embeddings (and untied output head) to
        `len(tokenizer)` when they have fewer rows, write the special-token ids (`special_token_ids`) and the
        tokenizer's pad id (`pad_token_id`) into `model.config`, and make `model.generation_config` stop at
        `[<|endofchunk|>, tokenizer EOS]` and pad with the tokenizer's pad (`<PAD>` when it had none). Never
        shrinks the embeddings. Returns the model."""
        needed = len(self.tokenizer)
        current = model.get_input_embeddings().weight.shape[0]
        if current < needed:
            logger.info(f"resizing the token embeddings from {current} to {needed} rows")
            model.resize_token_embeddings(needed, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=mean_resizing)
        for name, value in self.special_token_ids.items():
            if getattr(model.config, name, value) != value:
                logger.info(f"config.{name}: {getattr(model.config, name)} -> {value} (the tokenizer's id)")
            setattr(model.config, name, value)
        pad = self.tokenizer.pad_token_id
        if getattr(model.config, "pad_token_id", pad) != pad:
            logger.info(f"config.pad_token_id: {model.config.pad_token_id} -> {pad} (the tokenizer's pad)")
        model.config.pad_token_id = pad
        if hasattr(model, "stop_generation_at_end_of_chunk"):
            model.stop_generation_at_end_of_chunk(eos_token_id=self.tokenizer.eos_token_id)
        return model

    # ----- inputs -----------------------------------------------------------------------------------------------

    @staticmethod
    def _nest(items, batch_size: int | None, name: str, is_item) -> list[list]:
        """Per-prompt lists from `items`: a single item or a flat list of items belongs to one prompt; otherwise
        one list (or None for "nothing") per prompt."""
        if is_item(items):
            items = [items]
        if not isinstance(items, list | tuple):
            raise ValueError(
                f"{name}: expected a list (one list per prompt) or a flat list for one prompt, got {_describe(items)}"
            )
        nested = len(items) > 0 and all(isinstance(entry, list | tuple) or entry is None for entry in items)
        if not nested:
            for index, entry in enumerate(items):
                if isinstance(entry, list | tuple):
                    raise ValueError(
                        f"{name}: expected either a flat list of items for one prompt or one list per prompt, "
                        f"got a mix (entry {index} is a list, others are not)"
                    )
            if batch_size is not None and batch_size != 1:
                raise ValueError(
                    f"{name}: expected one list per prompt ({batch_size} in all), got a flat list of "
                    f"{len(items)} items; wrap each prompt's items in a list"
                )
            return [list(items)]
        nested_items = [list(entry) if entry is not None else [] for entry in items]
        if batch_size is not None and len(nested_items) != batch_size:
            raise ValueError(f"{name}: expected one list per prompt ({batch_size} in all), got {len(nested_items)}")
        return nested_items

    def _nest_images(self, images, batch_size: int | None) -> list[list]:
        nested = self._nest(images, batch_size, "images", _is_image)
        for sample, sample_images in enumerate(nested):
            for index, image in enumerate(sample_images):
                _check_image(image, f"images[{sample}][{index}]")
        return nested

    def _nest_videos(self, videos, batch_size: int | None) -> list[list]:
        if _is_frame_stack(videos):
            videos = [videos]
        if isinstance(videos, list | tuple):
            # 4-d frame stacks become lists of frames, so a batch of stacks reads as one list of frames per prompt
            videos = [list(video) if _is_frame_stack(video) else video for video in videos]
        nested = self._nest(videos, batch_size, "videos", _is_image)
        for sample, frames in enumerate(nested):
            if not frames:
                raise ValueError(f"videos[{sample}]: expected at least one frame, got none")
            for index, frame in enumerate(frames):
                _check_image(frame, f"videos[{sample}][{index}]")
        num_frames = [len(frames) for frames in nested]
        if len(set(num_frames)) > 1:
            raise ValueError(
                f"videos: expected the same number of frames in every video of the batch, got {num_frames}; "
                "sample the frames to a common count (padding frames would change the perceiver's input)"
            )
        return nested

    def _pixels(self, flat_images: list, images_kwargs: dict) -> torch.Tensor:
        images_kwargs = {**images_kwargs, "return_tensors": "pt"}
        pixel_values = self.image_processor(flat_images, **images_kwargs)["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            try:
                pixel_values = torch.stack([torch.as_tensor(value) for value in pixel_values])
            except RuntimeError as error:
                raise ValueError(
                    "images: the image processor returned images of different sizes; enable its center crop or "
                    f"resize to a fixed size ({error})"
                ) from error
        return pixel_values

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        videos=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenize prompts and preprocess their images.

        Args:
            text (`str` or `list[str]`): the prompts, with one `<image>` token where each image goes (Otter:
                `"<image>User: {question} GPT:<answer>"`).
            images: for a batch, one list of images per prompt (`[[img, img], [img]]`); for a single prompt, a flat
                list of its images or one image. Images are PIL images or 3-d (HWC or CHW) numpy arrays / torch tensors.
                Samples with fewer images than the longest list are padded with all-zero images.
            videos: one list of frames per prompt (or a flat list of frames, or a 4-d array, for one prompt). All
                videos of a batch need the same number of frames. A video goes to one `<image>` token.
            return_tensors (`str`, defaults to `"pt"`): `"pt"` or `"np"`; `None` leaves `input_ids` as lists.
            padding (defaults to `True`): the tokenizer's padding strategy.
            padding_side (`str`, defaults to `"left"`): left padding, so that generation continues every prompt.
            kwargs: tokenizer arguments (`max_length`, `truncation`, `add_special_tokens`, ...), image processor
                arguments, or `text_kwargs={...}` / `images_kwargs={...}`.

        Returns:
            [`BatchFeature`] with `input_ids` and `attention_mask` (when `text` is given) and `vision_x` of shape
            `(B, T_img, F, 3, H, W)`: images along `T_img` with `F=1`, or one video per sample as `(B, 1, F, ...)`.
            `vision_x` is left out when no image was given.
        """
        if text is None and images is None and videos is None:
            raise ValueError(f"{type(self).__name__}: expected text, images or videos, got none of them")
        if images is not None and videos is not None:
            raise ValueError(
                "expected either images or videos, got both; vision_x holds images along T_img (F=1) or one video "
                "along F (T_img=1), not a mix"
            )
        if isinstance(text, str):
            text = [text]
        if text is not None:
            if not isinstance(text, list | tuple) or not text:
                raise ValueError(f"text: expected a string or a non-empty list of strings, got {_describe(text)}")
            for index, prompt in enumerate(text):
                if not isinstance(prompt, str):
                    raise ValueError(f"text[{index}]: expected a string, got {_describe(prompt)}")
        batch_size = len(text) if text is not None else None

        explicit_text_kwargs = kwargs.get("text_kwargs", {})
        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = merged["text_kwargs"]
        text_kwargs["padding"] = explicit_text_kwargs.get("padding", padding)
        text_kwargs["padding_side"] = explicit_text_kwargs.get("padding_side", padding_side)
        text_kwargs["return_tensors"] = None
        images_kwargs = merged["images_kwargs"]

        data: dict[str, Any] = {}
        if images is not None:
            per_sample = self._nest_images(images, batch_size)
            num_media = [len(sample) for sample in per_sample]
            flat = [image for sample in per_sample for image in sample]
            if flat:
                pixels = self._pixels(flat, images_kwargs)
                vision_x = pixels.new_zeros((len(per_sample), max(num_media), 1, *pixels.shape[1:]))
                start = 0
                for sample, count in enumerate(num_media):
                    vision_x[sample, :count, 0] = pixels[start : start + count]
                    start += count
                data["vision_x"] = vision_x
        elif videos is not None:
            per_sample = self._nest_videos(videos, batch_size)
            num_media = [1] * len(per_sample)
            flat = [frame for frames in per_sample for frame in frames]
            pixels = self._pixels(flat, images_kwargs)
            data["vision_x"] = pixels.reshape(len(per_sample), 1, len(per_sample[0]), *pixels.shape[1:])
        else:
            num_media = [0] * (batch_size or 0)

        if text is not None:
            encoding = self.tokenizer(list(text), **text_kwargs)
            if "token_type_ids" in encoding and not text_kwargs.get("return_token_type_ids"):
                del encoding["token_type_ids"]
            self._check_media_tokens(encoding["input_ids"], num_media)
            data = {**encoding, **data}

        return BatchFeature(data, tensor_type=return_tensors)

    def _check_media_tokens(self, input_ids: list[list[int]], num_media: list[int]) -> None:
        for sample, (ids, count) in enumerate(zip(input_ids, num_media, strict=True)):
            tokens = list(ids).count(self.media_token_id)
            if tokens > count:
                raise ValueError(
                    f"prompt {sample} has {tokens} {self.media_token} token(s) but {count} image(s) were given for "
                    f"it; expected at least one image per {self.media_token} token"
                )
            if tokens < count:
                logger.warning_once(
                    f"prompt {sample} has {tokens} {self.media_token} token(s) but {count} image(s): the images "
                    f"after the {tokens}-th are encoded but no text attends to them"
                )

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "vision_x"]


__all__ = ["FlamingoProcessor"]
