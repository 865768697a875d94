"""Reading videos for `otter generate --video` and `otter demo`: the frames of a clip, resampled evenly.

- Animated GIF / WebP / PNG (and any other image, a one-frame video) are read with Pillow.
- Video files (MP4, WebM, MOV, AVI, MKV, ...: `VIDEO_SUFFIXES`) are decoded with PyAV, the `video` extra
  (`pip install 'otter-flamingo[video]'`), imported only when such a file is read.

Only the frames that are kept are converted to images: a long clip is decoded once, frame by frame, and never held
in memory whole. The frame count comes from the container when it records one (MP4, MOV, AVI), else from a first
pass over the packets (no decoding). Only ordinary video containers are opened (FFmpeg's playlist and concat
formats, which read other files, are refused), from local files only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

VIDEO_EXTRA_HINT = "pip install 'otter-flamingo[video]'"
# Files decoded with PyAV; everything else goes to Pillow.
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".3gp", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv"}
)
ANIMATED_IMAGES = "an animated GIF, WebP or PNG"
VIDEO_FILES = "a video file such as MP4, WebM, MOV, AVI or MKV"
# FFmpeg demuxers allowed to open a video file: containers only, no playlists (hls, concat) that open other files.
_DEMUXERS = "mov,matroska,avi,mpeg,mpegts,mpegvideo,m4v,asf,flv,ogg"
_CONTAINER_OPTIONS = {"format_whitelist": _DEMUXERS, "protocol_whitelist": "file"}


class VideoDecodeError(ValueError):
    """A file that is not a readable video. `path`, `expected` (what the file should have been) and `reason` (the
    decoder's message, without the path) are kept for callers that word the error their own way."""

    def __init__(self, path: os.PathLike | str, expected: str, reason: str):
        self.path, self.expected, self.reason = Path(path), expected, reason
        super().__init__(f"not a readable video: {path} (expected {expected}; {reason})")


class VideoDecoderMissing(ImportError):
    """A video file was given but PyAV (the `video` extra) is not installed."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        super().__init__(
            f"cannot decode {self.path.name}: {self.path.suffix or 'video'} files need PyAV, the `video` extra "
            f"({VIDEO_EXTRA_HINT})"
        )


def is_video_file(path: os.PathLike | str) -> bool:
    """Whether `path` is decoded with PyAV (by its suffix) rather than read as an (animated) image."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def video_decoder_available() -> bool:
    """Whether PyAV is installed, so that `VIDEO_SUFFIXES` files can be read."""
    import importlib.util

    try:
        return importlib.util.find_spec("av") is not None
    except (ImportError, ValueError):  # a broken or None entry in sys.modules
        return False


def sample_indices(count: int, limit: int | None) -> list[int]:
    """`limit` indices of `count` frames spread evenly over the clip, first and last included (rounded half to even,
    as `otter.data.resample_frames` does in training), or all of them when there are no more than `limit` (or
    `limit` is None or below 1)."""
    if limit is None or limit < 1 or count <= limit:
        return list(range(count))
    if limit == 1:
        return [0]
    step = (count - 1) / (limit - 1)
    return [round(i * step) for i in range(limit)]


def load_video_frames(path: os.PathLike | str, max_frames: int | None) -> list:
    """The frames of a video as RGB PIL images, resampled evenly to at most `max_frames` (None: all of them).

    Raises:
        FileNotFoundError: `path` is not a file.
        VideoDecodeError: (a ValueError) the file cannot be read as a video.
        VideoDecoderMissing: (an ImportError) a video file, but PyAV is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if is_video_file(path):
        return _decode_video_file(path, max_frames)
    return _read_animated_image(path, max_frames)


def check_video(path: os.PathLike | str) -> None:
    """Raise what `load_video_frames` would for a missing file, a missing decoder or a file that is not a video at
    all, without decoding it: a quick check before a slow step (loading a model). Damage inside the stream is only
    found when it is decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if is_video_file(path):
        av = _import_av(path)
        try:
            with av.open(str(path), container_options=_CONTAINER_OPTIONS) as container:
                has_video = bool(container.streams.video)
        except av.error.FFmpegError as error:
            raise VideoDecodeError(path, _expected(path), _reason(error, path)) from error
        if not has_video:
            raise VideoDecodeError(path, _expected(path), "it has no video stream")
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise VideoDecodeError(path, ANIMATED_IMAGES + ", or " + VIDEO_FILES, _reason(error, path)) from error


def _expected(path: Path) -> str:
    return f"a playable {path.suffix.lower()} video"


def _reason(error: BaseException, path: Path) -> str:
    """The first line of an error's message, without the path of the file (the caller names it)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    for quoted in (f": '{path}'", f" '{path}'", f": {path}", f" {path}", str(path)):
        text = text.replace(quoted, "")
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text.strip())  # PyAV's "[Errno 1094995529] Invalid data ..."
    return text or type(error).__name__


def _read_animated_image(path: Path, max_frames: int | None) -> list:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as clip:
            frames = []
            for index in sample_indices(getattr(clip, "n_frames", 1), max_frames):
                clip.seek(index)
                frames.append(clip.convert("RGB"))
            return frames
    except (UnidentifiedImageError, OSError, EOFError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise VideoDecodeError(path, ANIMATED_IMAGES + ", or " + VIDEO_FILES, _reason(error, path)) from error


def _import_av(path: Path):
    try:
        import av
    except ImportError as error:
        raise VideoDecoderMissing(path) from error
    return av


def _decode_video_file(path: Path, max_frames: int | None) -> list:
    av = _import_av(path)
    expected = _expected(path)
    try:
        with av.open(str(path), container_options=_CONTAINER_OPTIONS) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, expected, "it has no video stream")
            count = container.streams.video[0].frames
        if count <= 0:  # not recorded by the container (WebM, MKV, ...): count the packets
            with av.open(str(path), container_options=_CONTAINER_OPTIONS) as container:
                stream = container.streams.video[0]
                count = sum(1 for packet in container.demux(stream) if packet.size)
        wanted = sample_indices(count, max_frames)
        kept, decoded = _decode_frames(av, path, set(wanted))
        if decoded != count:
            # The recorded (or counted) number was wrong: pick again from the frames there really are.
            logger.info(f"{path.name}: {decoded} frames decoded, {count} expected; resampling from {decoded}")
            wanted = sample_indices(decoded, max_frames)
            if not set(wanted) <= kept.keys():
                kept, _ = _decode_frames(av, path, set(wanted))
    except av.error.FFmpegError as error:
        raise VideoDecodeError(path, expected, _reason(error, path)) from error
    if not wanted:
        raise VideoDecodeError(path, expected, "it has no video frames")
    logger.debug(f"{path.name}: frames {wanted} of {decoded}")
    return [kept[index] for index in wanted]


def _decode_frames(av, path: Path, wanted: set[int]) -> tuple[dict, int]:
    """Decode the whole video stream, keeping the frames at `wanted` (display order) as images; and the count."""
    kept = {}
    decoded = 0
    with av.open(str(path), container_options=_CONTAINER_OPTIONS) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept[index] = frame_to_image(frame)
            decoded = index + 1
    return kept, decoded


def frame_to_image(frame):
    """A decoded PyAV frame as an RGB PIL image, turned upright as the file says (phones record portrait video as
    landscape with a rotation)."""
    image = frame.to_image()
    if image.mode != "RGB":
        image = image.convert("RGB")
    rotation = getattr(frame, "rotation", 0) or 0  # degrees counterclockwise (PyAV >= 14)
    if rotation % 360:
        image = image.rotate(rotation, expand=True)
    return image
