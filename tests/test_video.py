"""`otter.video`: video files decoded with PyAV (the `video` extra) and animated images with Pillow, resampled evenly
as in training; the errors for broken files and for a missing decoder; `otter generate --video clip.mp4` on the
embedded default model."""

import struct
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image, ImageSequence

from otter.cli import main as cli_main
from otter.data import resample_frames
from otter.video import (
    VideoDecodeError,
    VideoDecoderMissing,
    check_video,
    load_video_frames,
    sample_indices,
    video_decoder_available,
)

FRAMES = REPO_ROOT / "examples" / "frames" / "purple_circle_moving_right"
EXTRA = "pip install 'otter-flamingo[video]'"


def bundled_frames() -> list:
    return [Image.open(path).convert("RGB") for path in sorted(FRAMES.glob("*.png"))]


def seven_frame_clip() -> list:
    """The bundled clip with the midpoints between neighbours: 7 frames, of which even resampling to 4 keeps frames
    0, 2, 4 and 6, the bundled ones (as in test_default_model's GIF test)."""
    frames = bundled_frames()
    clip = [frames[0]]
    for before, after in zip(frames, frames[1:], strict=False):
        clip += [Image.blend(before, after, 0.5), after]
    return clip


def write_video(path, frames, codecs=("libx264", "mpeg4"), rate=10):
    """Encode RGB frames into a video file with PyAV, with the first of `codecs` this PyAV build can encode."""
    av = pytest.importorskip("av")
    codec = next((name for name in codecs if _can_encode(av, name)), None)
    if codec is None:
        pytest.skip(f"PyAV has none of the encoders {codecs}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return path


def _can_encode(av, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


def mean_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", seven_frame_clip())


def test_sample_indices_are_trainings_resampling():
    for count in range(40):
        for limit in (None, 0, 1, 2, 3, 4, 7, 16):
            expected = list(range(count)) if not limit else list(resample_frames(tuple(range(count)), limit))
            assert sample_indices(count, limit) == expected, (count, limit)


def test_mp4_frames_are_resampled_evenly_with_the_right_colours(clip_mp4):
    frames = load_video_frames(clip_mp4, 4)
    assert len(frames) == 4 and all(frame.mode == "RGB" and frame.size == (224, 224) for frame in frames)
    diffs = [mean_abs_diff(frame, expected) for frame, expected in zip(frames, bundled_frames(), strict=True)]
    assert max(diffs) < 3, diffs  # a lossy codec: close to frames 0, 2, 4 and 6, the bundled ones
    # and each one is closer to its own bundled frame than to the others (the circle moves)
    assert mean_abs_diff(frames[1], bundled_frames()[1]) < mean_abs_diff(frames[1], bundled_frames()[2])
    assert len(load_video_frames(clip_mp4, None)) == len(load_video_frames(clip_mp4, 16)) == 7
    assert mean_abs_diff(load_video_frames(clip_mp4, 1)[0], bundled_frames()[0]) < 4


def test_a_container_without_a_frame_count_is_counted_first(tmp_path):
    """WebM / MKV do not record the number of frames: it is counted from the packets before decoding."""
    av = pytest.importorskip("av")
    path = write_video(tmp_path / "clip.mkv", seven_frame_clip(), codecs=("mpeg4", "libx264"))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    frames = load_video_frames(path, 4)
    assert len(frames) == 4
    assert max(mean_abs_diff(a, b) for a, b in zip(frames, bundled_frames(), strict=True)) < 4


@pytest.mark.parametrize("reported", [3, 20])
def test_a_wrong_frame_count_in_the_file_is_corrected(clip_mp4, monkeypatch, reported):
    """When the container's frame count is wrong, the frames are picked again from the frames really decoded."""
    import contextlib
    from types import SimpleNamespace

    import av

    import otter.video

    expected = [frame.tobytes() for frame in load_video_frames(clip_mp4, 4)]
    opened = []

    def open_with_a_wrong_count(*args, **kwargs):
        opened.append(args[0])
        if len(opened) == 1:  # the first open reads the count
            video = SimpleNamespace(frames=reported)
            return contextlib.nullcontext(SimpleNamespace(streams=SimpleNamespace(video=[video])))
        return av.open(*args, **kwargs)

    monkeypatch.setattr(
        otter.video, "_import_av", lambda path: SimpleNamespace(open=open_with_a_wrong_count, error=av.error)
    )
    assert [frame.tobytes() for frame in load_video_frames(clip_mp4, 4)] == expected
    assert len(opened) == 3  # the count, a decode that kept the wrong frames, and one that kept the right ones


def test_animated_gif_is_read_as_before(tmp_path):
    """GIF / WebP / PNG keep their behaviour: all frames through Pillow, then resampled as in training."""
    gif = tmp_path / "clip.gif"
    clip = seven_frame_clip()
    clip[0].save(gif, save_all=True, append_images=clip[1:], duration=100, loop=0)
    with Image.open(gif) as image:
        before = [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
    for limit in (None, 1, 3, 4, 16):
        expected = list(resample_frames(tuple(before), limit))
        assert [f.tobytes() for f in load_video_frames(gif, limit)] == [f.tobytes() for f in expected]
    still = load_video_frames(FRAMES / "frame_0.png", 4)  # a still image is a one-frame video
    assert len(still) == 1 and still[0].tobytes() == bundled_frames()[0].tobytes()


def test_rotated_phone_video_is_turned_upright(tmp_path):
    """Phones store portrait video as landscape with a rotation in the MP4 track header: frames come out upright."""
    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 16, 16))  # red top-left corner
    path = write_video(tmp_path / "portrait.mp4", [wide, wide])
    data = bytearray(path.read_bytes())
    matrix = data.index(b"tkhd") + 4 + 40  # version/flags, times, track id, duration, layer, volume: 40 bytes
    assert struct.unpack(">9i", data[matrix : matrix + 36])[:5] == (0x10000, 0, 0, 0, 0x10000)  # identity
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)  # 90° clockwise
    path.write_bytes(bytes(data))
    (frame,) = load_video_frames(path, 1)
    assert frame.size == (32, 64)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    assert np.abs(np.asarray(frame)[4, 28].astype(int) - red).max() < 40  # now the top-right corner
    assert np.abs(np.asarray(frame)[4, 4].astype(int) - blue).max() < 40


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("clip.mp4", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "a playable .mp4 video"),
        ("clip.webm", b"", "a playable .webm video"),
        ("notes.gif", b"not a gif", "an animated GIF, WebP or PNG"),
    ],
)
def test_unreadable_files_name_the_file_and_what_was_expected(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    for read in (check_video, lambda p: load_video_frames(p, 4)):
        with pytest.raises(VideoDecodeError) as error:
            read(path)
        assert isinstance(error.value, ValueError)
        assert str(error.value).startswith(f"not a readable video: {path} (expected {expected}")
        assert error.value.reason and str(path) not in error.value.reason
    with pytest.raises(FileNotFoundError, match="video not found"):
        load_video_frames(tmp_path / "missing.mp4", 4)


def test_playlists_that_open_other_files_are_refused(tmp_path, clip_mp4):
    """FFmpeg reads concat scripts and HLS playlists whatever the file's name, and they open other files: a demo
    upload must not make the server read its own files. Only plain containers are opened."""
    (tmp_path / "real.mp4").write_bytes(clip_mp4.read_bytes())
    script = tmp_path / "upload.mp4"
    script.write_text("ffconcat version 1.0\nfile real.mp4\n")
    with pytest.raises(VideoDecodeError):
        load_video_frames(script, 4)
    playlist = tmp_path / "playlist.mp4"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nreal.mp4\n#EXT-X-ENDLIST\n")
    with pytest.raises(VideoDecodeError):
        load_video_frames(playlist, 4)


def test_missing_pyav_names_the_extra(monkeypatch, clip_mp4, capsys):
    monkeypatch.setitem(sys.modules, "av", None)  # as if the `video` extra were not installed
    assert not video_decoder_available()
    with pytest.raises(VideoDecoderMissing) as error:
        load_video_frames(clip_mp4, 4)
    assert "clip.mp4" in str(error.value) and EXTRA in str(error.value)
    assert isinstance(VideoDecoderMissing(clip_mp4), ImportError)
    # animated images need no PyAV
    assert len(load_video_frames(FRAMES / "frame_0.png", 4)) == 1
    assert cli_main(["generate", "--video", str(clip_mp4), "--prompt", "Which way does it move?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and EXTRA in err[0] and "--frames DIR" in err[0], err


def test_cli_answers_about_an_mp4_as_about_the_gif(clip_mp4, tmp_path, capsys):
    """`otter generate --video clip.mp4` on the embedded default model: the 7-frame clip is resampled to the
    model's 4 frames and answered as the same clip as an animated GIF is."""
    gif = tmp_path / "clip.gif"
    clip = seven_frame_clip()
    clip[0].save(gif, save_all=True, append_images=clip[1:], duration=100, loop=0)
    for question, expected in (("Which way does it move?", "right"), ("What colour is the moving shape?", "purple")):
        answers = []
        for video in (clip_mp4, gif):
            capsys.readouterr()
            assert cli_main(["generate", "--video", str(video), "--prompt", question]) == 0
            answers.append(capsys.readouterr().out.strip())
        assert answers == [expected, expected], (question, answers)
