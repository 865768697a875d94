"""Batching: pad token ids and labels, and stack images into `vision_x` (B, T_img, F, 3, H, W)."""

from __future__ import annotations

import torch

from .samples import IGNORE_INDEX


class OtterDataCollator:
    """Pads a list of samples (`input_ids`, `labels`, `images` (T_img, F, 3, H, W) or None) into a batch.

    * Padding side: **right** by default. Training wants each row's real tokens at positions 0..n-1, exactly as
      when the row is run alone: decoders that derive positions from `arange` (LLaMA with no `position_ids`) or
      from the mask then see the same positions whatever the batch, and a row's loss does not depend on its
      batch-mates. Left padding is what generation needs (new tokens are appended on the right); pass
      `padding_side="left"` for scoring prompts the way they will be generated from.
    * `vision_x` has T_img = the largest number of images in the batch (at least 1); a sample with fewer images
      (or none: text-only) gets all-zero images there. No `<image>` token refers to them, so no text attends to
      them.
    * Frames are not padded: zero frames would be attended to by the perceiver and change the image's features,
      so a batch with different frame counts raises (`MixtureBatchSampler` batches by frame count).

    Returns `input_ids`, `attention_mask`, `labels`, `vision_x`, and (not model inputs) `sample_ids` and
    `skipped_records`.
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: str = "right",
        image_shape: tuple[int, int, int] | None = None,
        pad_to_multiple_of: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.pad_to_multiple_of = pad_to_multiple_of
        self.ignore_index = ignore_index

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        batch_size = len(samples)
        width = max(len(sample["input_ids"]) for sample in samples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), self.ignore_index, dtype=torch.long)
        for row, sample in enumerate(samples):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            row_labels = torch.as_tensor(sample["labels"], dtype=torch.long)
            if row_labels.shape != ids.shape:
                raise ValueError(
                    f"sample {sample.get('id')!r}: labels {tuple(row_labels.shape)} != ids {tuple(ids.shape)}"
                )
            span = slice(0, len(ids)) if self.padding_side == "right" else slice(width - len(ids), width)
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
            labels[row, span] = row_labels

        with_images = [sample["images"] for sample in samples if sample.get("images") is not None]
        frame_counts = {images.shape[1] for images in with_images}
        if len(frame_counts) > 1:
            raise ValueError(
                f"samples with different frame counts {sorted(frame_counts)} in one batch; zero frames would change "
                "the perceiver's output: batch by frame count (MixtureBatchSampler does)"
            )
        for images in with_images:
            if images.dim() != 5:
                raise ValueError(f"sample images must be (T_img, F, 3, H, W), got {tuple(images.shape)}")
        pixel_shapes = {tuple(images.shape[2:]) for images in with_images}
        if len(pixel_shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(pixel_shapes)} in one batch")
        if with_images:
            pixel_shape = pixel_shapes.pop()
            dtype = with_images[0].dtype
        elif self.image_shape is not None:
            pixel_shape, dtype = self.image_shape, torch.float32
        else:
            raise ValueError("a text-only batch needs the collator's image_shape (3, H, W) to build vision_x")
        num_media = max([images.shape[0] for images in with_images], default=1)
        num_frames = frame_counts.pop() if frame_counts else 1
        vision_x = torch.zeros((batch_size, num_media, num_frames, *pixel_shape), dtype=dtype)
        for row, sample in enumerate(samples):
            images = sample.get("images")
            if images is not None:
                vision_x[row, : images.shape[0]] = images
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "vision_x": vision_x,
            "sample_ids": [sample.get("id") for sample in samples],
            "skipped_records": [record for sample in samples for record in sample.get("skipped_records", [])],
        }


#: The keys of a collated batch that are not model inputs.
NON_MODEL_KEYS = ("sample_ids", "skipped_records")
