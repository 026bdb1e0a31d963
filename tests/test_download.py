"""Resumable downloads against a loopback server: resume, retries, verification and the on-disk state left."""

from __future__ import annotations

import hashlib
import random
import socket
import time
import urllib.parse
from types import SimpleNamespace

import pytest

from mdkat.data import download as download_module
from mdkat.data.download import Downloaded, DownloadError, download
from mdkat.errors import MdkatError
from tests.loopback import FileServer

FAST = {"backoff_s": 0.001, "timeout_s": 5.0, "progress": False}


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_plain_download_is_verified_recorded_and_reused(tmp_path):
    # Larger than the 1 MiB read size, so the body arrives in several chunks.
    content = payload(2_500_000)
    with FileServer({"raw/data.bin": content}) as server:
        got = download(server.url + "raw/data.bin", tmp_path / "dl", retries=0, **FAST)
        again = download(server.url + "raw/data.bin", tmp_path / "dl", retries=0, **FAST)
    target = tmp_path / "dl" / "data.bin"
    assert got == Downloaded(server.url + "raw/data.bin", target, digest(content), len(content))
    assert target.read_bytes() == content
    assert (tmp_path / "dl" / "data.bin.sha256").read_text().split() == [digest(content), "data.bin"]
    assert not (tmp_path / "dl" / "data.bin.part").exists()
    assert again == got
    assert server.requests == [{"path": "raw/data.bin", "range": None, "status": 200}]


def test_file_name_comes_from_the_unquoted_url_unless_given(tmp_path):
    content = payload(1000)
    with FileServer({"a dir/my file.csd": content}) as server:
        implicit = download(server.url + "a%20dir/my%20file.csd", tmp_path, retries=0, **FAST)
        explicit = download(
            server.url + "a%20dir/my%20file.csd", tmp_path, filename="x.csd", retries=0, **FAST
        )
    assert implicit.path == tmp_path / "my file.csd"
    assert explicit.path == tmp_path / "x.csd"
    assert explicit.path.read_bytes() == implicit.path.read_bytes() == content


def test_url_without_a_file_name_is_refused(tmp_path):
    with pytest.raises(DownloadError, match="filename"):
        download("http://127.0.0.1:9/dir/", tmp_path, **FAST)


def test_dropped_connection_keeps_the_part_and_the_next_call_resumes(tmp_path):
    content = payload(1_500_000, seed=1)
    sent = 1_234_567
    url_path = "big.bin"
    with FileServer({url_path: content}, drop_after={url_path: sent}) as server:
        with pytest.raises(DownloadError) as failure:
            download(server.url + url_path, tmp_path, retries=0, **FAST)
        assert server.url + url_path in str(failure.value)
        assert "1 attempt" in str(failure.value)
        part = tmp_path / "big.bin.part"
        assert part.read_bytes() == content[:sent]
        assert not (tmp_path / "big.bin").exists()

        got = download(server.url + url_path, tmp_path, sha256=digest(content), retries=0, **FAST)
    assert server.requests[1] == {"path": url_path, "range": f"bytes={sent}-", "status": 206}
    assert len(server.requests) == 2
    assert got.sha256 == digest(content) and got.path.read_bytes() == content
    assert not part.exists()


def test_dropped_connection_is_resumed_within_one_call_when_retries_remain(tmp_path):
    content = payload(300_000, seed=2)
    with FileServer({"f.bin": content}, drop_after={"f.bin": 99_999}) as server:
        got = download(server.url + "f.bin", tmp_path, retries=2, **FAST)
    assert [(r["range"], r["status"]) for r in server.requests] == [(None, 200), ("bytes=99999-", 206)]
    assert got.path.read_bytes() == content and got.sha256 == digest(content)


def test_service_unavailable_is_retried_until_it_succeeds(tmp_path):
    content = payload(5000, seed=3)
    with FileServer({"f.bin": content}, fail_first={"f.bin": 2}) as server:
        got = download(server.url + "f.bin", tmp_path, retries=2, **FAST)
    assert [r["status"] for r in server.requests] == [503, 503, 200]
    assert got.path.read_bytes() == content


def test_service_unavailable_beyond_the_retries_fails_naming_url_and_cause(tmp_path):
    with FileServer({"f.bin": payload(5000)}, fail_first={"f.bin": 2}) as server:
        with pytest.raises(DownloadError) as failure:
            download(server.url + "f.bin", tmp_path, retries=1, **FAST)
    message = str(failure.value)
    assert server.url + "f.bin" in message and "2 attempt" in message and "503" in message
    assert len(server.requests) == 2
    assert not (tmp_path / "f.bin").exists()


def test_backoff_doubles_and_is_capped(tmp_path, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(download_module, "time", SimpleNamespace(sleep=sleeps.append))
    with FileServer({"f.bin": b"x"}, fail_first={"f.bin": 10}) as server:
        with pytest.raises(DownloadError):
            download(server.url + "f.bin", tmp_path, retries=3, backoff_s=0.5, progress=False)
        with pytest.raises(DownloadError):
            download(server.url + "f.bin", tmp_path, retries=3, backoff_s=40.0, progress=False)
    assert sleeps == [0.5, 1.0, 2.0, 40.0, 60.0, 60.0]


def test_checksum_mismatch_removes_the_download(tmp_path):
    content = payload(4000, seed=4)
    wrong = digest(b"some other file")
    with FileServer({"f.bin": content}) as server:
        with pytest.raises(DownloadError) as failure:
            download(server.url + "f.bin", tmp_path, sha256=wrong.upper(), retries=0, **FAST)
    message = str(failure.value)
    assert server.url + "f.bin" in message and wrong in message and digest(content) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_malformed_expected_checksum_is_refused_before_any_request(tmp_path):
    with FileServer({"f.bin": b"abc"}) as server:
        with pytest.raises(DownloadError, match="64-digit"):
            download(server.url + "f.bin", tmp_path, sha256="abc123", **FAST)
    assert server.requests == []


def test_existing_target_is_checked_against_the_given_checksum(tmp_path):
    old, new = payload(3000, seed=5), payload(3000, seed=6)
    (tmp_path / "f.bin").write_bytes(old)
    with FileServer({"f.bin": new}) as server:
        kept = download(server.url + "f.bin", tmp_path, sha256=digest(old), **FAST)
        assert server.requests == []
        assert (tmp_path / "f.bin.sha256").read_text().split()[0] == digest(old)
        replaced = download(server.url + "f.bin", tmp_path, sha256=digest(new), **FAST)
    assert kept.sha256 == digest(old)
    assert replaced.sha256 == digest(new) and replaced.path.read_bytes() == new
    assert len(server.requests) == 1


def test_not_found_is_not_retried(tmp_path):
    with FileServer({}) as server:
        with pytest.raises(DownloadError) as failure:
            download(server.url + "missing.bin", tmp_path, retries=3, **FAST)
    assert server.url + "missing.bin" in str(failure.value) and "404" in str(failure.value)
    assert server.requests == [{"path": "missing.bin", "range": None, "status": 404}]
    assert isinstance(failure.value, MdkatError)


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    content = payload(50_000, seed=7)
    (tmp_path / "f.bin.part").write_bytes(b"\0" * 1234)
    with FileServer({"f.bin": content}, ignore_range=True) as server:
        got = download(server.url + "f.bin", tmp_path, retries=0, **FAST)
    assert server.requests == [{"path": "f.bin", "range": "bytes=1234-", "status": 200}]
    assert got.path.read_bytes() == content and got.size == len(content)


def test_part_that_is_already_whole_is_finished_from_the_416_reply(tmp_path):
    content = payload(8000, seed=8)
    (tmp_path / "f.bin.part").write_bytes(content)
    with FileServer({"f.bin": content}) as server:
        got = download(server.url + "f.bin", tmp_path, sha256=digest(content), retries=0, **FAST)
    assert server.requests == [{"path": "f.bin", "range": "bytes=8000-", "status": 416}]
    assert got.path.read_bytes() == content


def test_part_longer_than_the_remote_file_is_discarded(tmp_path):
    content = payload(8000, seed=9)
    (tmp_path / "f.bin.part").write_bytes(content + b"stale tail")
    with FileServer({"f.bin": content}) as server:
        got = download(server.url + "f.bin", tmp_path, retries=0, **FAST)
    assert [(r["range"], r["status"]) for r in server.requests] == [("bytes=8010-", 416), (None, 200)]
    assert got.path.read_bytes() == content


def test_unreachable_server_fails_quickly_naming_the_url(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/f.bin"
    started = time.monotonic()
    with pytest.raises(DownloadError) as failure:
        download(url, tmp_path, retries=1, **FAST)
    assert time.monotonic() - started < 3.0
    assert url in str(failure.value) and "2 attempt" in str(failure.value)
    assert not (tmp_path / "f.bin").exists()


def test_silent_server_times_out(tmp_path):
    # A listening socket that never accepts: the connection is queued but no reply ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/f.bin"
        started = time.monotonic()
        with pytest.raises(DownloadError) as failure:
            download(url, tmp_path, retries=1, backoff_s=0.001, timeout_s=0.2, progress=False)
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3.0
    assert url in str(failure.value) and "timed out" in str(failure.value)


@pytest.mark.parametrize("damage", ["flip a byte", "lose the sidecar"])
def test_unverifiable_existing_target_is_fetched_again(tmp_path, damage):
    content = payload(20_000, seed=10)
    with FileServer({"f.bin": content}) as server:
        first = download(server.url + "f.bin", tmp_path, retries=0, **FAST)
        if damage == "flip a byte":
            broken = bytearray(content)
            broken[777] ^= 0xFF
            first.path.write_bytes(bytes(broken))
        else:
            (tmp_path / "f.bin.sha256").unlink()
        second = download(server.url + "f.bin", tmp_path, retries=0, **FAST)
    assert [(r["range"], r["status"]) for r in server.requests] == [(None, 200), (None, 200)]
    assert second.path.read_bytes() == content and second.sha256 == digest(content)
    assert (tmp_path / "f.bin.sha256").read_text().split()[0] == digest(content)


def test_progress_goes_to_stderr_only_and_can_be_turned_off(tmp_path, capsys):
    content = payload(10_000, seed=11)
    with FileServer({"f.bin": content}) as server:
        download(server.url + "f.bin", tmp_path / "loud", retries=0, backoff_s=0.001, progress=True)
        loud = capsys.readouterr()
        download(server.url + "f.bin", tmp_path / "quiet", retries=0, backoff_s=0.001, progress=False)
        quiet = capsys.readouterr()
    assert loud.out == "" and "f.bin" in loud.err and "100%" in loud.err
    assert quiet.out == "" and quiet.err == ""


def test_credentials_in_the_url_are_sent_as_http_basic_and_never_printed(tmp_path):
    user, password = "reader", "s3cr:t/p@ss"  # reserved characters, percent-encoded in the URL
    content = payload(2_000, seed=11)
    quoted = urllib.parse.quote(password, safe="")
    with FileServer({"data.pkl": content}, basic_auth=(user, password)) as server:
        url = server.url.replace("http://", f"http://{user}:{quoted}@") + "data.pkl"
        got = download(url, tmp_path, sha256=digest(content), **FAST)
        assert got.path.read_bytes() == content
        with pytest.raises(DownloadError) as failure:  # a wrong password: 401 is not retried
            download(url.replace(quoted, "wrong") + ".x", tmp_path, retries=2, **FAST)
    message = str(failure.value)
    assert "401" in message and "wrong" not in message and f"{user}:***@" in message
    assert [r["status"] for r in server.requests] == [200, 401]
