"""Calibration frame sources: specs, video/folder/file loading, and preprocessing identical to the pipeline's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.quant.frames import FrameSourceError, FrameSpec, load_all, load_frames, prepare
from daemon.sources.replay import iter_video_jpegs


@pytest.mark.parametrize(
    ("text", "start", "stop", "step"),
    [
        ("a.avi", None, None, None),
        ("a.avi@:300", None, 300, None),
        ("a.avi@300:", 300, None, None),
        ("a.avi@10:20:5", 10, 20, 5),
        ("dir/with@sign.avi@-5:", -5, None, None),
    ],
)
def test_spec_parse_and_str_round_trip(text: str, start: int | None, stop: int | None, step: int | None) -> None:
    s = FrameSpec.parse(text)
    assert (s.start, s.stop, s.step) == (start, stop, step)
    assert FrameSpec.parse(str(s)) == s


def test_video_range_matches_replay_source_bytes(vtest_path: Path) -> None:
    frames = load_frames(f"{vtest_path}@3:9:2")
    assert [f.name.rsplit("#", 1)[1] for f in frames] == ["3", "5", "7"]
    replay = list(iter_video_jpegs(vtest_path, 90, 8))
    assert [f.jpeg for f in frames] == [replay[3], replay[5], replay[7]]
    assert len({f.digest for f in frames}) == 3
    assert load_frames(f"{vtest_path}@3:4")[0].digest == frames[0].digest  # re-encoding is deterministic


def test_folder_and_single_file(tmp_path: Path, bus_path: Path, zidane_path: Path) -> None:
    (tmp_path / "b.jpg").write_bytes(bus_path.read_bytes())
    (tmp_path / "a.jpeg").write_bytes(zidane_path.read_bytes())
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = load_frames(str(tmp_path))
    assert [f.name.rsplit("#", 1)[1] for f in frames] == ["a.jpeg", "b.jpg"]
    assert frames[1].jpeg == bus_path.read_bytes()
    both = load_all([str(bus_path), f"{tmp_path}@1:"])
    assert [f.jpeg for f in both] == [bus_path.read_bytes(), bus_path.read_bytes()]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.avi", "does not exist"),
        (lambda p: p, "holds no .jpg/.jpeg files"),
        (lambda p: (p / "bad.avi").write_bytes(b"not a video" * 50) and p / "bad.avi", "cannot open .* as a video"),
    ],
)
def test_bad_sources_name_the_source(tmp_path: Path, make: object, message: str) -> None:
    target = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(FrameSourceError, match=message):
        load_frames(str(target))


def test_empty_selection_is_an_error(bus_path: Path) -> None:
    with pytest.raises(FrameSourceError, match="holds no frames"):
        load_frames(f"{bus_path}@1:")


def test_prepare_is_the_pipeline_preprocessing(zidane_path: Path) -> None:
    frame = load_frames(str(zidane_path))[0]
    p = prepare(frame, (640, 640))
    expected = np.empty((3, 640, 640), np.float32)
    lb = letterbox_into(decode_jpeg(frame.jpeg, 40_000_000), 640, expected)
    assert p.letterbox == lb
    assert np.array_equal(p.tensor, expected)
    assert p.tensor[:, 0, 0].tolist() == pytest.approx([114 / 255] * 3)  # gray letterbox band at the top
