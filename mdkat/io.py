"""Files: atomic writes (an interrupted stage never leaves a half-written file behind), hashing, and where
the project lives."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

_DVC_TEMP = re.compile(r"^(?P<root>.*?)/\.dvc/tmp/exps/")


def project_root(start: str | Path | None = None) -> Path:
    """The repository root: the folder holding `dvc.yaml` (the original one, not a DVC temp copy).

    DVC runs queued experiments in a copy under `.dvc/tmp/exps/` that it deletes afterwards: stores kept
    there (MLflow runs, Optuna studies) would be lost with it.
    """
    path = Path(start or os.getcwd()).resolve()
    match = _DVC_TEMP.match(path.as_posix() + "/")
    if match:
        return Path(match.group("root"))
    for folder in (path, *path.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".git").exists():
            return folder
    return path


def _default_mode(directory: bool) -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; published outputs get the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _prefix(path: Path, label: str = "") -> str:
    """`.<name>.[<label>.]<pid>.`: temporary siblings of `path` say whose they are."""
    return f".{path.name}.{label + '.' if label else ''}{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of `path` (`.<name>.*.tmp`, `.old`) left by processes that died.

    A process killed with SIGKILL never runs its cleanup; the next one that writes `path` does it. Those of
    a process still running stay (it may be another worker writing next to us).
    """
    path = Path(path)
    removed = []
    for entry in path.parent.glob(f".{glob_escape(path.name)}.*"):
        if entry.suffix not in (".tmp", ".old"):
            continue
        # `<pid>.<random>` or `<label>.<pid>.<random>`; labels are never all digits, random parts may be
        fields = entry.name[len(path.name) + 2 :].split(".")
        owner = next((int(f) for f in fields[:2] if f.isdigit()), None)
        if owner is not None and _alive(owner):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def scratch_dir(destination: str | Path, label: str) -> Iterator[Path]:
    """A working folder next to `destination`, named after it and `label`, removed when the block ends
    (and by the next run, if this process is killed)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(destination)
    tmp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=_prefix(destination, label), suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to (by name); renamed over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for binary writing; rename it over `path` only on success."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: an undefined metric is written as null, never as the non-standard token NaN.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """`data` as pretty, key-sorted JSON (NaN and inf as null): what `write_json` writes."""
    return json.dumps(_json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as pretty, key-sorted JSON (NaN and inf as null), atomically."""
    text = json_text(data)
    with atomic_open(path) as f:
        f.write(text.encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in for `path` only when the block succeeds.

    On failure the temporary directory is removed and whatever was at `path` before stays untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".old"))
            os.replace(path, old / "content")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
