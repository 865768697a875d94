"""Readers for the MIMIC-IT text files (reference §6):

* instruction JSON: `{"meta": {...}, "data": {id: {"instruction", "answer", "image_ids", "rel_ins_ids"}}}`;
* train-config JSON: `{id: [in-context ids]}`; its keys are the training set;
* the YAML mixture of task groups (`IMAGE_TEXT`, `TEXT_ONLY`, `VIDEO_TEXT`, `IMAGE_TEXT_IN_CONTEXT`), each entry
  with `mimicit_path`, `images_path`, `train_config_path` and `num_samples`.

Every record is type-checked; a bad one raises a `DataError` naming the file and the record id, or is logged and
counted when the caller's `BadRecords` policy skips bad records.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from .errors import BadRecords, DataError

logger = logging.get_logger(__name__)


class TaskType(str, enum.Enum):
    """How the records of a source become a training sample (reference §6).

    * `image`: one visual input (the query's images, frames on F, T_img=1) shared by the query and its in-context
      turns, one `<image>` at the start (single-image QA, conversations).
    * `video`: the same as `image`, with the frames resampled to at most `max_frames` (DC, E4D, FunQA).
    * `in_context`: the query and its in-context examples each bring their own image: T_img=N, F=1 (LA).
    * `text`: no images at all.
    """

    IMAGE = "image"
    VIDEO = "video"
    IN_CONTEXT = "in_context"
    TEXT = "text"


#: The YAML groups of Otter's data recipes and the sample layout each one means.
GROUP_TASK_TYPES = {
    "IMAGE_TEXT": TaskType.IMAGE,
    "VIDEO_TEXT": TaskType.VIDEO,
    "IMAGE_TEXT_IN_CONTEXT": TaskType.IN_CONTEXT,
    "TEXT_ONLY": TaskType.TEXT,
}


@dataclass(frozen=True)
class InstructionRecord:
    id: str
    instruction: str
    answer: str
    image_ids: tuple[str, ...] = ()
    rel_ins_ids: tuple[str, ...] = ()


@dataclass
class MimicitSource:
    """One dataset of a mixture: its files, how its samples are built, and how many to draw per epoch
    (`num_samples`: -1 or 0 = every training id once; more than there are = repeats, then a random remainder)."""

    name: str
    task_type: TaskType
    mimicit_path: Path
    images_path: Path | None = None
    train_config_path: Path | None = None
    num_samples: int = -1
    group: str | None = None
    extra: dict = field(default_factory=dict)


def _read_json(path: Path):
    if not path.is_file():
        raise DataError("file not found", path)
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON: {error}", path) from None
    except UnicodeDecodeError as error:
        raise DataError(f"invalid JSON (not UTF-8): {error}", path) from None


def _string_list(value, field_name: str, path: Path, record_id: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise DataError(f"field {field_name!r} must be a list of strings, got {type(value).__name__}", path, record_id)
    for item in value:
        if not isinstance(item, str):
            raise DataError(
                f"field {field_name!r} must be a list of strings, found {type(item).__name__} {item!r}",
                path,
                record_id,
            )
    return tuple(value)


def parse_instruction_record(record_id, record, path: Path) -> InstructionRecord:
    """Type-check one record of an instruction file; raise a `DataError` naming the file and the record."""
    if not isinstance(record_id, str) or not record_id:
        raise DataError("record ids must be non-empty strings", path, str(record_id))
    if not isinstance(record, dict):
        raise DataError(f"a record must be an object, got {type(record).__name__}", path, record_id)
    for name in ("instruction", "answer"):
        if name not in record:
            raise DataError(f"missing field {name!r}", path, record_id)
        if not isinstance(record[name], str):
            raise DataError(f"field {name!r} must be a string, got {type(record[name]).__name__}", path, record_id)
    if not record["answer"].strip():
        raise DataError("field 'answer' is empty", path, record_id)
    if not record["instruction"].strip():
        raise DataError("field 'instruction' is empty", path, record_id)
    image_ids = _string_list(record.get("image_ids", []), "image_ids", path, record_id)
    rel_ins_ids = _string_list(record.get("rel_ins_ids", []), "rel_ins_ids", path, record_id)
    return InstructionRecord(record_id, record["instruction"], record["answer"], image_ids, rel_ins_ids)


def load_instructions(
    path: str | os.PathLike, bad_records: BadRecords | None = None, rejected: set[str] | None = None
) -> dict[str, InstructionRecord]:
    """Read and check an instruction JSON. Bad records raise, or are logged and counted by `bad_records` (and their
    ids added to `rejected`, when given)."""
    path = Path(path)
    bad_records = bad_records or BadRecords()
    content = _read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), dict):
        raise DataError('expected an object {"meta": {...}, "data": {id: record}}', path)
    records = {}
    for record_id, record in content["data"].items():
        try:
            records[record_id] = parse_instruction_record(record_id, record, path)
        except DataError as error:
            bad_records.handle(error)
            if rejected is not None:
                rejected.add(str(record_id))
    logger.info(f"{path}: {len(records)} instruction records")
    return records


def load_train_config(path: str | os.PathLike, bad_records: BadRecords | None = None) -> dict[str, tuple[str, ...]]:
    """Read a train-config JSON `{id: [in-context ids]}` (insertion order kept: it is the dataset order)."""
    path = Path(path)
    bad_records = bad_records or BadRecords()
    content = _read_json(path)
    if not isinstance(content, dict):
        raise DataError(f"expected an object {{id: [in-context ids]}}, got {type(content).__name__}", path)
    config = {}
    for record_id, context_ids in content.items():
        try:
            config[record_id] = _string_list(context_ids, "in-context ids", path, record_id)
        except DataError as error:
            bad_records.handle(error)
    return config


def _resolve(value, base: Path, yaml_path: Path, entry: str, key: str) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise DataError(f"{key} must be a path string, got {type(value).__name__}", yaml_path, entry)
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return path
    beside_yaml = base / path
    if beside_yaml.exists() or not path.exists():
        return beside_yaml  # relative to the YAML file first (a missing file is reported with this path)
    return path  # relative to the working directory, as the original recipes are written


def load_mixture_yaml(path: str | os.PathLike) -> list[MimicitSource]:
    """Read a mixture YAML:

    ```yaml
    IMAGE_TEXT_IN_CONTEXT:
      LACR_I2I:
        mimicit_path: LA/LACR_I2I_instructions.json
        images_path: LA/LA.json          # or .parquet
        train_config_path: LA/LACR_I2I_train.json
        num_samples: 20000               # -1: all
    ```

    Relative paths are taken relative to the YAML file, or to the working directory when only that exists.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError("mixture YAML not found", path)
    with open(path) as handle:
        try:
            content = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise DataError(f"invalid YAML: {error}", path) from None
    if not isinstance(content, dict) or not content:
        raise DataError(f"expected a mapping of groups {sorted(GROUP_TASK_TYPES)} to datasets", path)
    sources = []
    base = path.parent
    for group, entries in content.items():
        if group not in GROUP_TASK_TYPES:
            raise DataError(f"unknown group {group!r}: expected one of {sorted(GROUP_TASK_TYPES)}", path)
        if entries is None:
            continue  # an empty group (everything commented out)
        if not isinstance(entries, dict):
            raise DataError(f"group {group}: expected a mapping of dataset names to settings", path)
        for name, settings in entries.items():
            if not isinstance(settings, dict):
                raise DataError(f"expected a mapping with mimicit_path, images_path, ...; got {settings!r}", path, name)
            unknown = set(settings) - {
                "mimicit_path",
                "images_path",
                "train_config_path",
                "num_samples",
                "task_description",
            }
            if unknown:
                logger.warning(f"{path}: dataset {name!r}: ignoring unknown keys {sorted(unknown)}")
            mimicit_path = _resolve(settings.get("mimicit_path"), base, path, name, "mimicit_path")
            if mimicit_path is None:
                raise DataError("missing mimicit_path", path, name)
            images_path = _resolve(settings.get("images_path"), base, path, name, "images_path")
            task_type = GROUP_TASK_TYPES[group]
            if images_path is None and task_type != TaskType.TEXT:
                raise DataError(f"group {group} needs an images_path", path, name)
            num_samples = settings.get("num_samples", -1)
            if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < -1:
                raise DataError(f"num_samples must be an integer >= -1, got {num_samples!r}", path, name)
            sources.append(
                MimicitSource(
                    name=str(name),
                    task_type=task_type,
                    mimicit_path=mimicit_path,
                    images_path=images_path,
                    train_config_path=_resolve(
                        settings.get("train_config_path"), base, path, name, "train_config_path"
                    ),
                    num_samples=num_samples,
                    group=group,
                )
            )
    if not sources:
        raise DataError("no datasets in the mixture", path)
    return sources
