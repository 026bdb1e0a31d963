"""Resumable, verified HTTP downloads for the raw data files.

Bytes stream into `<target>.part` and only a complete, verified file is renamed to `<target>`, so a
reader never sees a truncated file under the final name. An interrupted transfer keeps its `.part` and
the next attempt (in the same call or a later one) asks for the rest with an HTTP Range request. A
sidecar `<target>.sha256` (in `sha256sum` format) records the digest of the complete file, which lets a
later call trust an existing file without touching the network.
"""

from __future__ import annotations

import http.client
import os
import posixpath
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mdkat.errors import MdkatError
from mdkat.io import atomic_open, sha256_file
from mdkat.redact import basic_auth, redact

CHUNK = 1 << 20
MAX_BACKOFF_S = 60.0
# Request timeout, too many requests, and server-side failures can pass; other 4xx replies will not.
RETRY_STATUSES = frozenset({408, 429})
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", re.IGNORECASE)
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class DownloadError(MdkatError):
    """A file could not be fetched, or what was fetched is not the expected file."""


@dataclass(frozen=True)
class Downloaded:
    """A complete, verified file on disk and the URL it came from."""

    url: str
    path: Path
    sha256: str
    size: int


class _Transient(Exception):
    """A failure that another attempt may get past, resuming from the bytes already in the part file."""


def download(
    url: str,
    dest_dir: str | Path,
    *,
    sha256: str | None = None,
    retries: int = 4,
    timeout_s: float = 30.0,
    backoff_s: float = 1.0,
    filename: str | None = None,
    progress: bool = True,
) -> Downloaded:
    """Fetch `url` into `dest_dir` (resumable), verify it, and return where it is."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    expected = _expected_digest(url, sha256)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / _target_name(url, filename)
    part = target.with_name(target.name + ".part")
    sidecar = target.with_name(target.name + ".sha256")

    digest = _existing_digest(target, sidecar, expected)
    if digest is not None:
        return Downloaded(url=url, path=target, sha256=digest, size=target.stat().st_size)

    attempts = retries + 1
    cause: _Transient | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        try:
            _fetch(url, part, timeout_s, progress)
            break
        except _Transient as exc:
            cause = exc
    else:
        kept = f"; the {part.stat().st_size} bytes in {part} are kept for resuming" if part.exists() else ""
        raise DownloadError(f"could not download {redact(url)} after {attempts} attempt(s): {cause}{kept}")

    actual = sha256_file(part)
    if expected is not None and actual != expected:
        part.unlink()
        raise DownloadError(
            f"checksum mismatch for {redact(url)}: expected sha256 {expected}, got {actual}; "
            "the file was deleted"
        )
    # Drop any stale sidecar first: a crash before the new one is written must not vouch for the new file.
    sidecar.unlink(missing_ok=True)
    os.replace(part, target)
    _write_sidecar(sidecar, actual, target.name)
    return Downloaded(url=url, path=target, sha256=actual, size=target.stat().st_size)


def _expected_digest(url: str, sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if not _HEX_DIGEST.fullmatch(digest):
        raise DownloadError(f"expected sha256 for {redact(url)} is not a 64-digit hex digest: {sha256!r}")
    return digest


def _target_name(url: str, filename: str | None) -> str:
    if filename is None:
        # Take the basename before unquoting so that an encoded slash cannot smuggle in a directory.
        filename = urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path))
    if filename in ("", ".", "..") or any(c in filename for c in "/\\\0"):
        raise DownloadError(f"no usable file name for {redact(url)}: {filename!r}; pass a plain filename")
    return filename


def _read_sidecar(sidecar: Path) -> str | None:
    try:
        fields = sidecar.read_text().split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return fields[0].lower() if fields and _HEX_DIGEST.fullmatch(fields[0].lower()) else None


def _write_sidecar(sidecar: Path, digest: str, name: str) -> None:
    with atomic_open(sidecar) as f:
        f.write(f"{digest}  {name}\n".encode())


def _existing_digest(target: Path, sidecar: Path, expected: str | None) -> str | None:
    """Digest of an existing target that verifies; a target that does not is removed."""
    if not target.is_file():
        return None
    recorded = _read_sidecar(sidecar)
    reference = expected if expected is not None else recorded
    if reference is not None:
        actual = sha256_file(target)
        if actual == reference:
            if recorded != actual:
                _write_sidecar(sidecar, actual, target.name)
            return actual
    # Without a digest to check against, an existing file may be a leftover of unknown origin.
    target.unlink()
    sidecar.unlink(missing_ok=True)
    return None


def _fetch(url: str, part: Path, timeout_s: float, progress: bool) -> None:
    """One attempt: bring `part` up to the whole remote file, continuing from its current size."""
    while True:
        offset = part.stat().st_size if part.exists() else 0
        plain, headers = basic_auth(url)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(plain, headers=headers), timeout=timeout_s
            )
        except urllib.error.HTTPError as exc:
            try:
                if exc.code == 416 and offset:
                    if _content_range(exc.headers.get("Content-Range"))[1] == offset:
                        return
                    # The part is longer than the remote file, or the server will not say: start over.
                    part.unlink()
                    continue
                if exc.code >= 500 or exc.code in RETRY_STATUSES:
                    raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
                raise DownloadError(
                    f"could not download {redact(url)}: HTTP {exc.code} {exc.reason}"
                ) from None
            finally:
                exc.close()
        except OSError as exc:  # URLError (refused, unresolvable) and timeouts while connecting
            raise _Transient(_describe(exc)) from exc
        try:
            with response:
                if _stream(response, part, offset, progress):
                    return
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(_describe(exc)) from exc
        if offset == 0:
            raise _Transient("the server sent part of the file when asked for all of it")
        # A partial reply that does not continue the part (no or a later start offset): start over.
        part.unlink()


def _stream(response: http.client.HTTPResponse, part: Path, offset: int, progress: bool) -> bool:
    """Write the reply body into `part`; False when a 206 reply cannot be joined to the bytes there."""
    length = _to_int(response.headers.get("Content-Length"))
    if response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start is None or start > offset:
            return False
        # A server may resend a little more than asked; the bytes before `start` are still good.
        offset = start
    else:
        # A 200 reply to a Range request means the server ignored it and sends the whole file.
        offset, total = 0, length
    end = offset + length if length is not None else None
    with (
        open(part, "r+b" if offset else "wb") as f,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            file=sys.stderr,
        ) as bar,
    ):
        f.truncate(offset)
        f.seek(offset)
        while block := response.read(CHUNK):
            f.write(block)
            bar.update(len(block))
        f.flush()
        os.fsync(f.fileno())
        written = f.tell()
    # http.client returns a short body without complaint when the peer closes early; count it ourselves.
    if end is not None and written < end:
        raise _Transient(f"connection closed after {written - offset} of {length} bytes")
    return True


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header, None for what it does not give."""
    match = _CONTENT_RANGE.fullmatch(header.strip()) if header else None
    if match is None:
        return None, None
    return _to_int(match.group(1)), _to_int(match.group(2))


def _to_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return _describe(exc.reason)
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
