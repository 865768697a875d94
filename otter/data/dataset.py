"""`MimicitDataset`: training samples from one or more MIMIC-IT sources (a YAML mixture or explicit files).

Everything that can be checked without decoding pixels is checked when the dataset is built (record fields, in-context
ids, image ids present in the images file); images are decoded lazily in `__getitem__`, where bad base64 or an
undecodable image raises a `DataError` naming the file and the image id (or, with `skip_bad_records=True`, is logged,
replaced by the next sample, and reported in the sample's `skipped_records`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers.utils import logging

from ..video import sample_indices
from .errors import BadRecords, DataError
from .images import ImageStore, ImageTransform, ImageTransformFn, open_image_store
from .mimicit import InstructionRecord, MimicitSource, TaskType, load_instructions, load_train_config
from .samples import IGNORE_INDEX, SpecialTokens, build_labels, format_prompt

logger = logging.get_logger(__name__)

MAX_SUBSTITUTIONS = 16


@dataclass(frozen=True)
class SampleSpec:
    """One training sample before loading: the query, its in-context ids, and the images it will have."""

    source: int
    query_id: str
    context_ids: tuple[str, ...]
    num_media: int  # T_img
    num_frames: int  # F (0 for text-only)


def resample_frames(image_ids: tuple[str, ...], max_frames: int | None) -> tuple[str, ...]:
    """At most `max_frames` ids, evenly spaced and including the first and the last (as Otter's `resample_frames`)."""
    if max_frames is None or len(image_ids) <= max_frames:
        return image_ids
    return tuple(image_ids[i] for i in sample_indices(len(image_ids), max_frames))


class MimicitDataset(Dataset):
    """Samples from MIMIC-IT sources.

    Args:
        sources: the datasets (from `load_mixture_yaml` or built by hand).
        tokenizer: a tokenizer with `<image>`, `<answer>`, `<|endofchunk|>`, BOS, EOS and a pad token.
        image_transform: PIL image -> float tensor (3, H, W). Default: `ImageTransform(224)`.
        max_frames: videos with more frames are resampled evenly to this many (use the model's `max_num_frames`).
        max_length: longer token sequences are truncated (with a warning naming the sample).
        max_in_context: keep at most this many in-context ids per query (None: all).
        shuffle_in_context: shuffle an in-context sample's examples together with the query, with a generator
            seeded by (seed, epoch, query id) (reference §6, LA tasks). Other task types keep the file order:
            in-context turns first, the query last.
        seed: seeds the in-context shuffle.
        skip_bad_records: log and count bad records instead of raising.
        image_index_cache: a directory where the byte offsets of JSON image files are kept between runs and
            processes (the first one scans, the others read).
    """

    def __init__(
        self,
        sources: list[MimicitSource],
        tokenizer,
        image_transform: ImageTransformFn | None = None,
        *,
        max_frames: int | None = None,
        max_length: int | None = 2048,
        max_in_context: int | None = None,
        shuffle_in_context: bool = True,
        seed: int = 0,
        skip_bad_records: bool = False,
        image_index_cache: str | Path | None = None,
    ):
        if not sources:
            raise ValueError("MimicitDataset needs at least one source")
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.tokens = SpecialTokens.from_tokenizer(tokenizer)
        self.image_transform = image_transform if image_transform is not None else ImageTransform(224)
        self.max_frames = max_frames
        self.max_length = max_length
        self.max_in_context = max_in_context
        self.shuffle_in_context = shuffle_in_context
        self.seed = seed
        self.epoch = 0
        self.bad_records = BadRecords(skip_bad_records)

        self.records: list[dict[str, InstructionRecord]] = []
        self.stores: list[ImageStore | None] = []
        self.specs: list[SampleSpec] = []
        self.source_ranges: list[tuple[int, int, int]] = []
        stores_by_path: dict[Path, ImageStore] = {}
        for index, source in enumerate(self.sources):
            rejected: set[str] = set()
            records = load_instructions(source.mimicit_path, self.bad_records, rejected)
            store = None
            if source.task_type != TaskType.TEXT:
                if source.images_path is None:
                    raise DataError(f"source {source.name!r} ({source.task_type.value}) needs an images file", None)
                key = Path(source.images_path).resolve()
                if key not in stores_by_path:
                    stores_by_path[key] = open_image_store(source.images_path, cache_dir=image_index_cache)
                store = stores_by_path[key]
            if source.train_config_path is not None:
                train_config = load_train_config(source.train_config_path, self.bad_records)
                config_file = source.train_config_path
            else:
                train_config = {record_id: () for record_id in records}
                config_file = source.mimicit_path
            self.records.append(records)
            self.stores.append(store)
            start = len(self.specs)
            for query_id, context_ids in train_config.items():
                bad_ids = rejected.intersection((query_id, *context_ids))
                if bad_ids:  # already reported and counted once, as a bad record of the instruction file
                    logger.warning(f"{config_file}: sample {query_id!r} not built: bad records {sorted(bad_ids)}")
                    continue
                try:
                    self.specs.append(self._plan(index, query_id, context_ids, config_file))
                except DataError as error:
                    self.bad_records.handle(error)
            stop = len(self.specs)
            if stop == start:
                raise DataError(f"source {source.name!r} has no usable samples", config_file)
            self.source_ranges.append((start, stop, source.num_samples))
            logger.info(f"source {source.name!r} ({source.task_type.value}): {stop - start} samples")
        if self.bad_records.total:
            logger.warning(f"while reading the data: {self.bad_records.summary()}")

    # ----- planning (no pixels) ---------------------------------------------------------------------------------

    def _plan(self, source_index: int, query_id: str, context_ids: tuple[str, ...], config_file) -> SampleSpec:
        source = self.sources[source_index]
        records = self.records[source_index]
        if query_id not in records:
            raise DataError(
                f"id not found (or bad) in the instruction file {source.mimicit_path}", config_file, query_id
            )
        if self.max_in_context is not None:
            context_ids = context_ids[: self.max_in_context]
        for context_id in context_ids:
            if context_id not in records:
                raise DataError(
                    f"in-context id {context_id!r} not found (or bad) in the instruction file {source.mimicit_path}",
                    config_file,
                    query_id,
                )
        task = source.task_type
        if task == TaskType.TEXT:
            return SampleSpec(source_index, query_id, tuple(context_ids), 0, 0)
        store = self.stores[source_index]
        if task == TaskType.IN_CONTEXT:
            examples = [records[i] for i in (*context_ids, query_id)]
        else:
            examples = [records[query_id]]
        frames = None
        for record in examples:
            image_ids = resample_frames(record.image_ids, self.max_frames)
            if not image_ids:
                raise DataError(f"no image_ids, but {task.value} samples need an image", source.mimicit_path, record.id)
            if frames is not None and len(image_ids) != frames:
                raise DataError(
                    f"in-context examples must have the same number of images: {record.id!r} has {len(image_ids)}, "
                    f"another has {frames}",
                    source.mimicit_path,
                    query_id,
                )
            frames = len(image_ids)
            for image_id in image_ids:
                if image_id not in store:
                    raise DataError(f"image id {image_id!r} not found in {store.path}", source.mimicit_path, record.id)
        return SampleSpec(source_index, query_id, tuple(context_ids), len(examples), frames)

    # ----- loading ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.specs)

    def set_epoch(self, epoch: int) -> None:
        """Select the in-context shuffles of this epoch (call before iterating, as the trainer does)."""
        self.epoch = epoch

    def bucket_keys(self) -> list[int]:
        """Frames per image of every sample (text-only samples count as 1): batches must not mix them."""
        return [max(spec.num_frames, 1) for spec in self.specs]

    def sample_ids(self) -> list[str]:
        return [spec.query_id for spec in self.specs]

    def ordered_ids(self, spec: SampleSpec) -> list[str]:
        """The record ids of a sample in prompt order."""
        ids = [*spec.context_ids, spec.query_id]
        source = self.sources[spec.source]
        if self.shuffle_in_context and source.task_type == TaskType.IN_CONTEXT and len(ids) > 1:
            random.Random(f"{self.seed}:{self.epoch}:{source.name}:{spec.query_id}").shuffle(ids)
        return ids

    def __getitem__(self, index: int) -> dict:
        if not -len(self.specs) <= index < len(self.specs):
            raise IndexError(f"sample index {index} out of range for {len(self.specs)} samples")
        index %= len(self.specs)
        skipped = []
        for attempt in range(MAX_SUBSTITUTIONS):
            current = (index + attempt) % len(self.specs)
            try:
                sample = self.load(current)
            except DataError as error:
                if not self.bad_records.skip:
                    raise
                self.bad_records.handle(error)
                skipped.append(f"{error.file}:{error.record_id}")
                continue
            sample["skipped_records"] = skipped
            return sample
        raise DataError(f"{MAX_SUBSTITUTIONS} bad samples in a row from index {index}; the data is too broken to skip")

    def load(self, index: int) -> dict:
        """Build sample `index`: token ids, labels and images, or raise a `DataError`."""
        spec = self.specs[index]
        source = self.sources[spec.source]
        records = self.records[spec.source]
        ordered = [records[i] for i in self.ordered_ids(spec)]
        text = format_prompt(source.task_type, [(r.instruction, r.answer) for r in ordered])
        tokens = self.tokens
        ids = [tokens.bos, *self.tokenizer(text, add_special_tokens=False)["input_ids"], tokens.eos]
        if self.max_length is not None and len(ids) > self.max_length:
            logger.warning(
                f"{source.mimicit_path}: record {spec.query_id!r}: {len(ids)} tokens, truncated to {self.max_length}"
            )
            ids = ids[: self.max_length]
        labels = build_labels(ids, tokens.answer, tokens.end_of_chunk, tokens.eos)
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("no answer token left to train on (truncated?)", source.mimicit_path, spec.query_id)

        images = None
        if source.task_type != TaskType.TEXT:
            examples = ordered if source.task_type == TaskType.IN_CONTEXT else [records[spec.query_id]]
            media = []
            for record in examples:
                frames = [
                    self._image(spec.source, image_id, record.id)
                    for image_id in resample_frames(record.image_ids, self.max_frames)
                ]
                media.append(torch.stack(frames))
            images = torch.stack(media)  # (T_img, F, 3, H, W)
        return {
            "id": spec.query_id,
            "source": source.name,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images": images,
        }

    def _image(self, source_index: int, image_id: str, record_id: str) -> torch.Tensor:
        store = self.stores[source_index]
        try:
            image = store.load(image_id)
        except DataError as error:
            source = self.sources[source_index]
            raise DataError(
                f"{error.reason} (an image of record {record_id!r} of {source.mimicit_path})",
                error.file,
                error.record_id,
            ) from None
        pixels = self.image_transform(image)
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3:
            shape = tuple(pixels.shape) if hasattr(pixels, "shape") else type(pixels).__name__
            raise TypeError(f"image_transform must return a (3, H, W) tensor, got {shape} for image {image_id!r}")
        return pixels

    def check_images(self) -> int:
        """Decode every image the samples use (one pass over the images), so that bad base64 or undecodable images
        are found before training: they raise, or with `skip_bad_records` are logged, counted, and their samples
        removed. Returns the number of distinct images checked."""
        checked: dict[tuple[int, str], bool] = {}
        kept = []
        for spec in self.specs:
            good = True
            for _record_id, image_id in self._image_ids(spec):
                key = (spec.source, image_id)
                if key not in checked:
                    try:
                        self.stores[spec.source].load(image_id)
                        checked[key] = True
                    except DataError as error:
                        checked[key] = False
                        self.bad_records.handle(error)
                good = good and checked[key]
            if good:
                kept.append(spec)
            else:
                logger.warning(f"removing sample {spec.query_id!r} of {self.sources[spec.source].name!r}: a bad image")
        if len(kept) != len(self.specs):
            self.specs = kept
            self._rebuild_ranges()
        return len(checked)

    def _image_ids(self, spec: SampleSpec):
        source = self.sources[spec.source]
        if source.task_type == TaskType.TEXT:
            return
        records = self.records[spec.source]
        ids = (*spec.context_ids, spec.query_id) if source.task_type == TaskType.IN_CONTEXT else (spec.query_id,)
        for record_id in ids:
            for image_id in resample_frames(records[record_id].image_ids, self.max_frames):
                yield record_id, image_id

    def _rebuild_ranges(self) -> None:
        ranges = []
        for index, source in enumerate(self.sources):
            positions = [i for i, spec in enumerate(self.specs) if spec.source == index]
            if not positions:
                raise DataError(f"source {source.name!r} has no usable samples left", source.mimicit_path)
            ranges.append((positions[0], positions[-1] + 1, source.num_samples))
        self.source_ranges = ranges
