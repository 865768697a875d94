"""MIMIC-IT image files, read lazily.

Two formats hold `{image_id: urlsafe-base64 image}`:

* JSON (`LA.json`, the June-2023 release): one object. `JsonImageStore` scans it once, in fixed-size chunks, and
  keeps only the byte offsets of each value; an image is then read with one `seek` + `read` of its own bytes. A 10 GB
  file is never held in memory.
* Parquet (later releases): a `base64` column and an id column (`id`, `image_id`, or the stored pandas index).
  `ParquetImageStore` reads the id column once and an image's row group on demand; a row group too large to read
  whole is streamed page by page (bounded memory, slow random access: repack it with `repack_parquet`).

Decoding checks the base64 strictly and the image fully, and raises a `DataError` naming the file and the image id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.utils import logging

from .errors import DataError

logger = logging.get_logger(__name__)

# Otter's training normalisation (reference §5): squash-resize, then these rounded OpenAI CLIP statistics.
FLAMINGO_MEAN = (0.481, 0.458, 0.408)
FLAMINGO_STD = (0.269, 0.261, 0.276)

_WHITESPACE = b" \t\r\n"


# ----- decoding ---------------------------------------------------------------------------------------------------


def decode_base64(value: str | bytes, file: str | os.PathLike | None = None, image_id: str | None = None) -> bytes:
    """Strictly decode a (urlsafe or standard) base64 string. Characters outside the alphabet raise a `DataError`
    (Python's `urlsafe_b64decode` would silently drop them). Missing `=` padding is tolerated."""
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            raise DataError("bad base64: non-ASCII characters in the image string", file, image_id) from None
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"bad base64: expected a string, got {type(value).__name__}", file, image_id)
    value = bytes(value).strip()
    if value.startswith(b"data:") and b"," in value[:100]:
        value = value.split(b",", 1)[1]  # data URI prefix
    if not value:
        raise DataError("bad base64: empty image string", file, image_id)
    if len(value) % 4:
        value += b"=" * (-len(value) % 4)
    altchars = None if (b"+" in value or b"/" in value) else b"-_"
    try:
        return base64.b64decode(value, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as error:
        raise DataError(f"bad base64: {error}", file, image_id) from None


def decode_image(data: bytes, file: str | os.PathLike | None = None, image_id: str | None = None) -> Image.Image:
    """Bytes of an image file -> fully decoded RGB PIL image, or a `DataError` naming the file and image id."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"undecodable image: not a known image format ({len(data)} bytes)", file, image_id) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"undecodable image ({type(error).__name__}: {error})", file, image_id) from None


class ImageTransform:
    """PIL image -> float tensor (3, size, size): squash-resize (bicubic), scale to [0, 1], normalise. This is
    Otter's training preprocessing (reference §5) without torchvision. Any callable PIL -> (3, H, W) tensor can be
    used instead (for example a `CLIPImageProcessor` wrapped in a lambda)."""

    def __init__(self, size: int = 224, mean=FLAMINGO_MEAN, std=FLAMINGO_STD, resample=Image.Resampling.BICUBIC):
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.resample = resample

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __repr__(self):
        return f"ImageTransform(size={self.size}, mean={tuple(self.mean)}, std={tuple(self.std)})"


# ----- stores -----------------------------------------------------------------------------------------------------


class ImageStore:
    """A read-only mapping image id -> image, loaded on demand. Safe to use from DataLoader worker processes: file
    handles are opened per process and never pickled."""

    path: Path

    def __contains__(self, image_id: str) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def ids(self) -> Iterator[str]:
        raise NotImplementedError

    def get_base64(self, image_id: str) -> str:
        raise NotImplementedError

    def get_bytes(self, image_id: str) -> bytes:
        """The decoded image file bytes (PNG/JPEG...), or a `DataError`."""
        return decode_base64(self.get_base64(image_id), self.path, image_id)

    def load(self, image_id: str) -> Image.Image:
        """The RGB image, or a `DataError` (missing id, bad base64, undecodable image) naming file and id."""
        return decode_image(self.get_bytes(image_id), self.path, image_id)

    def _missing(self, image_id: str) -> DataError:
        return DataError("image id not found in the images file", self.path, image_id)


class _ChunkReader:
    """Sequential reader over a binary file with a bounded buffer, tracking absolute byte offsets."""

    def __init__(self, handle, chunk_size: int):
        self.handle = handle
        self.chunk_size = chunk_size
        self.buf = b""
        self.base = 0  # absolute offset of buf[0]
        self.pos = 0  # index into buf

    def fill(self) -> bool:
        data = self.handle.read(self.chunk_size)
        if not data:
            return False
        self.base += self.pos
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def offset(self) -> int:
        return self.base + self.pos

    def peek(self) -> int | None:
        """The next non-whitespace byte (not consumed), or None at end of file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return None

    def string_span(self, keep: bool) -> tuple[int, int, bool, bytes]:
        """At an opening quote: consume a JSON string. Returns (start, end) absolute offsets of its raw content,
        whether it contains escapes, and the raw bytes if `keep` (only for short strings such as keys)."""
        assert self.buf[self.pos : self.pos + 1] == b'"'
        self.pos += 1
        start = self.offset()
        escaped = False
        kept = []
        while True:
            quote = self.buf.find(b'"', self.pos)
            backslash = self.buf.find(b"\\", self.pos, quote if quote >= 0 else len(self.buf))
            if backslash >= 0:
                escaped = True
                if backslash + 1 >= len(self.buf):  # the escaped byte is in the next chunk
                    if keep:
                        kept.append(self.buf[self.pos : backslash])
                    self.pos = backslash
                    if not self.fill():
                        raise EOFError
                    continue
                if keep:
                    kept.append(self.buf[self.pos : backslash + 2])
                self.pos = backslash + 2
                continue
            if quote >= 0:
                if keep:
                    kept.append(self.buf[self.pos : quote])
                end = self.base + quote
                self.pos = quote + 1
                return start, end, escaped, b"".join(kept)
            if keep:
                kept.append(self.buf[self.pos :])
            self.pos = len(self.buf)
            if not self.fill():
                raise EOFError

    def expect(self, byte: bytes, what: str, path) -> None:
        found = self.peek()
        if found is None:
            raise DataError(f"truncated JSON: expected {what} at byte {self.offset()}, got end of file", path)
        if found != byte[0]:
            raise DataError(f"malformed JSON: expected {what} at byte {self.offset()}, got {chr(found)!r}", path)
        self.pos += 1


def index_json_object(path: str | os.PathLike, chunk_size: int = 1 << 20) -> dict[str, tuple[int, int, bool]]:
    """Scan a JSON object of strings `{key: "value", ...}` in chunks of `chunk_size` bytes and return
    `{key: (start, end, escaped)}`: the byte offsets of each value's raw content. Memory is bounded by the chunk size
    and the number of keys, not the file size. A value that is not a string raises a `DataError` naming the key."""
    path = Path(path)
    index: dict[str, tuple[int, int, bool]] = {}
    duplicates = 0
    with open(path, "rb") as handle:
        reader = _ChunkReader(handle, chunk_size)
        if reader.peek() == 0xEF and reader.buf[reader.pos : reader.pos + 3] == b"\xef\xbb\xbf":
            reader.pos += 3  # UTF-8 BOM
        first = reader.peek()
        if first != ord("{"):
            got = "end of file" if first is None else repr(chr(first))
            raise DataError(f"expected a JSON object {{image_id: base64}}, got {got} at the start", path)
        reader.pos += 1
        try:
            if reader.peek() == ord("}"):
                return index
            while True:
                if reader.peek() != ord('"'):
                    got = reader.peek()
                    got = "end of file" if got is None else repr(chr(got))
                    raise DataError(f"malformed JSON: expected a string key at byte {reader.offset()}, got {got}", path)
                _, _, key_escaped, raw_key = reader.string_span(keep=True)
                key = json.loads(b'"' + raw_key + b'"') if key_escaped else raw_key.decode("utf-8")
                reader.expect(b":", "':'", path)
                value_start = reader.peek()
                if value_start != ord('"'):
                    kind = "end of file" if value_start is None else _json_kind(value_start)
                    raise DataError(f"wrong type: the image must be a base64 string, got {kind}", path, key)
                start, end, escaped, _ = reader.string_span(keep=False)
                if key in index:
                    duplicates += 1
                index[key] = (start, end, escaped)
                separator = reader.peek()
                if separator == ord(","):
                    reader.pos += 1
                    continue
                if separator == ord("}"):
                    break
                got = "end of file" if separator is None else repr(chr(separator))
                raise DataError(f"malformed JSON: expected ',' or '}}' at byte {reader.offset()}, got {got}", path)
        except EOFError:
            raise DataError(
                f"truncated JSON: the file ends inside a string (after {len(index)} images)", path
            ) from None
    if duplicates:
        logger.warning(f"{path}: {duplicates} duplicated image ids; the last value of each is used (as json.load does)")
    return index


def _json_kind(byte: int) -> str:
    char = chr(byte)
    if char == "{":
        return "an object"
    if char == "[":
        return "an array"
    if char in "-0123456789":
        return "a number"
    if char in "tf":
        return "a boolean"
    if char == "n":
        return "null"
    return repr(char)


class JsonImageStore(ImageStore):
    """`{image_id: base64}` JSON, indexed by byte offsets in one chunked scan (`chunk_size` bytes per read).
    Fetching an image reads exactly its own bytes.

    With `cache_dir`, the offsets are saved there (keyed by the file's path, size and modification time) and
    reused, so the scan runs once, not once per process or per run."""

    def __init__(self, path: str | os.PathLike, chunk_size: int = 1 << 20, cache_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("images file not found", self.path)
        self.chunk_size = chunk_size
        self._index = self._cached_index(Path(cache_dir)) if cache_dir is not None else None
        if self._index is None:
            self._index = index_json_object(self.path, chunk_size)
            if cache_dir is not None:
                self._save_index(Path(cache_dir))
        self._handle = None
        self._handle_pid = None
        logger.info(f"{self.path}: indexed {len(self._index)} images")

    def _cache_file(self, cache_dir: Path) -> Path:
        stat = self.path.stat()
        key = f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return cache_dir / f"{self.path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.offsets.json"

    def _cached_index(self, cache_dir: Path) -> dict | None:
        cache_file = self._cache_file(cache_dir)
        if not cache_file.is_file():
            return None
        try:
            with open(cache_file) as handle:
                content = json.load(handle)
            index = {key: (int(start), int(end), bool(escaped)) for key, (start, end, escaped) in content.items()}
        except (OSError, ValueError, TypeError) as error:
            logger.warning(f"{cache_file}: unreadable offsets cache ({error}); scanning {self.path} again")
            return None
        logger.info(f"{self.path}: offsets read from {cache_file}")
        return index

    def _save_index(self, cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = self._cache_file(cache_dir)
        temporary = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        with open(temporary, "w") as handle:
            json.dump({key: list(value) for key, value in self._index.items()}, handle)
        os.replace(temporary, cache_file)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def __contains__(self, image_id):
        return image_id in self._index

    def __len__(self):
        return len(self._index)

    def ids(self):
        return iter(self._index)

    def _file(self):
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the life of the store
            self._handle_pid = os.getpid()
        return self._handle

    def get_base64(self, image_id: str) -> str:
        try:
            start, end, escaped = self._index[image_id]
        except KeyError:
            raise self._missing(image_id) from None
        handle = self._file()
        handle.seek(start)
        raw = handle.read(end - start)
        if len(raw) != end - start:
            raise DataError("images file changed or was truncated after it was indexed", self.path, image_id)
        if escaped:
            return json.loads(b'"' + raw + b'"')
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DataError("bad base64: non-ASCII characters in the image string", self.path, image_id) from None

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class ParquetImageStore(ImageStore):
    """Parquet with a `base64` column, indexed by its id column (read once, at open time).

    A row group whose `base64` column chunk is at most `max_cached_row_group_bytes` (uncompressed) is read whole on
    a lookup and kept (the last `cache_row_groups` of them). A larger row group (pandas/pyarrow write up to 1M rows
    in one by default) is never read whole: it is streamed page by page in batches of `stream_batch_rows` images
    up to the requested one, so memory per lookup is bounded by the parquet page size, not the row group size. That
    costs I/O proportional to the image's position in its group, so a warning at open time names such groups; fix
    the file with `python scripts/repack_parquet.py IN OUT --row-group-size 64` (or `repack_parquet`)."""

    ID_COLUMNS = ("id", "image_id", "__index_level_0__")

    def __init__(
        self,
        path: str | os.PathLike,
        base64_column: str = "base64",
        cache_row_groups: int = 2,
        max_cached_row_group_bytes: int = 16 << 20,
        stream_batch_rows: int = 16,
    ):
        try:
            import pyarrow.parquet  # noqa: F401 - fail early, with a hint
        except ImportError as error:  # pragma: no cover - pyarrow is in the `train` extra
            raise ImportError("parquet image files need pyarrow: pip install 'otter-flamingo[train]'") from error
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("images file not found", self.path)
        self.base64_column = base64_column
        self.cache_row_groups = cache_row_groups
        self.max_cached_row_group_bytes = max_cached_row_group_bytes
        self.stream_batch_rows = stream_batch_rows
        parquet = _open_parquet(self.path)
        names = parquet.schema_arrow.names
        if base64_column not in names:
            raise DataError(f"no {base64_column!r} column (columns: {names})", self.path)
        self.id_column = self._find_id_column(parquet, names)
        self._index: dict[str, tuple[int, int]] = {}
        self._streamed: set[int] = set()
        metadata = parquet.metadata
        for group in range(parquet.num_row_groups):
            ids = parquet.read_row_group(group, columns=[self.id_column]).column(0).to_pylist()
            for row, image_id in enumerate(ids):
                if not isinstance(image_id, str):
                    raise DataError(
                        f"wrong type: image ids must be strings, got {type(image_id).__name__} {image_id!r} "
                        f"(row group {group}, row {row})",
                        self.path,
                    )
                self._index[image_id] = (group, row)
            size = _column_chunk_bytes(metadata.row_group(group), base64_column)
            if size > max_cached_row_group_bytes:
                self._streamed.add(group)
        if self._streamed:
            largest = max(self._streamed, key=lambda g: metadata.row_group(g).num_rows)
            logger.warning(
                f"{self.path}: {len(self._streamed)} of {parquet.num_row_groups} row groups are too large to read "
                f"whole (row group {largest}: {metadata.row_group(largest).num_rows} images, "
                f"{_column_chunk_bytes(metadata.row_group(largest), base64_column) / 2**20:.1f} MiB of "
                f"{base64_column!r}); their images are streamed page by page, which keeps memory bounded but makes "
                f"each lookup read the row group up to the image (slow random access). Rewrite the file with small "
                f"row groups: python scripts/repack_parquet.py {self.path} OUT.parquet --row-group-size 64"
            )
        self._parquet = None
        self._parquet_pid = None
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._cursor = None  # (group, batch iterator, first row of `batch`, batch) of the streamed group being read
        logger.info(f"{self.path}: indexed {len(self._index)} images in {parquet.num_row_groups} row groups")

    def _find_id_column(self, parquet, names) -> str:
        metadata = parquet.schema_arrow.metadata or {}
        pandas_meta = metadata.get(b"pandas")
        if pandas_meta:
            index_columns = [c for c in json.loads(pandas_meta).get("index_columns", []) if isinstance(c, str)]
            if len(index_columns) == 1 and index_columns[0] in names:
                return index_columns[0]
        for name in self.ID_COLUMNS:
            if name in names:
                return name
        raise DataError(f"no image id column: expected one of {self.ID_COLUMNS} or a pandas index", self.path)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_parquet"] = None
        state["_parquet_pid"] = None
        state["_cache"] = OrderedDict()
        state["_cursor"] = None
        return state

    def __contains__(self, image_id):
        return image_id in self._index

    def __len__(self):
        return len(self._index)

    def ids(self):
        return iter(self._index)

    def _file(self):
        if self._parquet is None or self._parquet_pid != os.getpid():
            self._parquet = _open_parquet(self.path)
            self._parquet_pid = os.getpid()
            self._cache.clear()
            self._cursor = None
        return self._parquet

    def _cached_value(self, group: int, row: int):
        if group in self._cache:
            self._cache.move_to_end(group)
            column = self._cache[group]
        else:
            column = self._file().read_row_group(group, columns=[self.base64_column]).column(0)
            self._cache[group] = column
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        return column[row].as_py()

    def _streamed_value(self, group: int, row: int, image_id: str):
        parquet = self._file()
        cursor = self._cursor
        if cursor is None or cursor[0] != group or row < cursor[2]:
            batches = parquet.iter_batches(
                batch_size=self.stream_batch_rows, row_groups=[group], columns=[self.base64_column], use_threads=False
            )
            cursor = (group, batches, 0, None)
        group, batches, start, batch = cursor
        self._cursor = None
        while batch is None or row >= start + batch.num_rows:
            if batch is not None:
                start += batch.num_rows
            batch = next(batches, None)
            if batch is None:
                raise DataError("images file changed or was truncated after it was indexed", self.path, image_id)
        self._cursor = (group, batches, start, batch)
        return batch.column(0)[row - start].as_py()

    def get_base64(self, image_id: str):
        try:
            group, row = self._index[image_id]
        except KeyError:
            raise self._missing(image_id) from None
        if group in self._streamed:
            value = self._streamed_value(group, row, image_id)
        else:
            value = self._cached_value(group, row)
        if not isinstance(value, (str, bytes)):
            raise DataError(
                f"wrong type: the image must be a base64 string, got {type(value).__name__}", self.path, image_id
            )
        return value


def _open_parquet(path):
    import pyarrow.parquet as pq

    # buffer_size > 0 and no pre-buffering: column chunks are read through a small buffer, page by page, instead of
    # whole into memory, so a streamed read holds a page or two however large its row group is.
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)


def _column_chunk_bytes(row_group, column: str) -> int:
    for index in range(row_group.num_columns):
        chunk = row_group.column(index)
        if chunk.path_in_schema == column:
            return chunk.total_uncompressed_size
    return 0


def repack_parquet(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    row_group_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Rewrite a parquet images file with `row_group_size` rows per row group (and so per page at most), streaming
    it in bounded memory. Written to a temporary file next to `destination` and renamed over it at the end, so an
    interrupted repack never leaves a half-written file (`source` may be `destination`). Schema, column order and
    pandas metadata are kept; `progress(rows)` is called after each row group."""
    import pyarrow.parquet as pq

    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise DataError("images file not found", source)
    parquet = _open_parquet(source)
    compression = "snappy"
    if parquet.num_row_groups and parquet.metadata.row_group(0).num_columns:
        compression = parquet.metadata.row_group(0).column(0).compression.lower()
        if compression == "uncompressed":
            compression = "none"
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(temporary, parquet.schema_arrow, compression=compression) as writer:
            for batch in parquet.iter_batches(batch_size=row_group_size, use_threads=False):
                writer.write_batch(batch, row_group_size=row_group_size)
                if progress is not None:
                    progress(batch.num_rows)
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.info(f"{destination}: repacked {parquet.metadata.num_rows} rows in row groups of {row_group_size}")
    return destination


def open_image_store(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> ImageStore:
    """A `JsonImageStore` for `.json` (its offsets cached in `cache_dir` when given), a `ParquetImageStore` for
    `.parquet`."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return JsonImageStore(path, cache_dir=cache_dir)
    if suffix in (".parquet", ".pq"):
        return ParquetImageStore(path)
    raise DataError("unsupported images file: expected .json or .parquet", path)


ImageTransformFn = Callable[[Image.Image], torch.Tensor]
