"""Atomic writes leave no debris: a process killed mid-write leaves its temporary sibling, the next writer
of the same destination removes it, and a live writer's is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mdkat.io import atomic_dir, atomic_open, remove_stale, scratch_dir

# a writer that stops forever inside the atomic block, with its temporary folder made
WRITER = """
import sys, time
from mdkat.io import atomic_dir, scratch_dir
kind, target = sys.argv[1], sys.argv[2]
block = atomic_dir(target) if kind == "dir" else scratch_dir(target, "trial3")
with block as tmp:
    (tmp / "part.npz").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def _writer(kind: str, target: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir() and tmp.parent == target.parent
    return proc, tmp


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("kind", ["dir", "scratch"])
def test_a_killed_writers_folder_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path, kind):
    target = tmp_path / "prepared"
    dead, dead_tmp = _writer(kind, target)
    _kill(dead)
    assert dead_tmp.exists(), "SIGKILL runs no cleanup: the folder stays until someone removes it"
    live, live_tmp = _writer(kind, target)
    try:
        assert dead_tmp.name.startswith(".prepared.") and dead_tmp.name.endswith(".tmp")
        assert str(dead.pid) in dead_tmp.name.split(".")
        with atomic_dir(target) as tmp:
            (tmp / "train.npz").write_bytes(b"done")
        assert not dead_tmp.exists()
        assert live_tmp.exists(), "a writer that is still running keeps its folder"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prepared", live_tmp.name])
    finally:
        _kill(live)
    assert remove_stale(target) == [live_tmp] and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_killed_file_writers_temporary_file_goes_with_the_next_write(tmp_path):
    target = tmp_path / "metrics.json"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _kill(proc)
    stale = tmp_path / f".metrics.json.{proc.pid}.abc123.tmp"  # as atomic_open names it
    stale.write_bytes(b"half")
    older = tmp_path / ".metrics.json.k2j3h4g5.tmp"  # a name without an owner: an older version's
    older.write_bytes(b"half")
    unrelated = tmp_path / ".metrics.jsonx.1.a.tmp"
    unrelated.write_bytes(b"not ours")
    with atomic_open(target) as f:
        f.write(b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.json", unrelated.name])


def test_scratch_folders_live_next_to_their_destination_and_go_when_done(tmp_path):
    destination = tmp_path / "tuning" / "best.yaml"
    with scratch_dir(destination, "trial7") as tmp:
        assert tmp.parent == destination.parent
        assert tmp.name.startswith(f".best.yaml.trial7.{os.getpid()}.") and tmp.name.endswith(".tmp")
        (tmp / "checkpoint.pt").write_bytes(b"x")
    assert not tmp.exists() and list(destination.parent.iterdir()) == []
    with pytest.raises(RuntimeError), scratch_dir(destination, "trial8") as tmp:
        raise RuntimeError("a failing trial")
    assert not tmp.exists()
