"""A PostgreSQL server for tests: a fresh cluster in a temporary folder, on a free loopback port.

The server refuses to run as root, and the machines that run the tests do: as root, `initdb` and `postgres`
run as the `postgres` user (`runuser`), in a folder that user owns. No skip: a machine without the server
fails the tests that need it (`make setup` installs it).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

USER, PASSWORD, DATABASE = "tuner", "hunter22", "optuna"


def _bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not versions:
        pytest.fail(
            "PostgreSQL server not found (initdb): `make setup` installs it (apt-get install postgresql)"
        )
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb, start, a database owned by a password-protected role; `url` for SQLAlchemy; `stop`."""

    def __init__(self) -> None:
        self.bin = _bindir()
        self.as_root = os.geteuid() == 0
        # not under pytest's tmp_path: its parents are private to root, and the server runs as postgres
        self.folder = Path(tempfile.mkdtemp(prefix="mdkat-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        command = self._as_server(
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.folder),
            "-c",
            "fsync=off",
        )
        self.log = open(self.folder / "server.log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        self.url = f"postgresql+psycopg://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def _as_server(self, *command: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if self.as_root else list(command)

    def _run(self, tool: str, *args: str) -> str:
        done = subprocess.run(self._as_server(str(self.bin / tool), *args), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` as the superuser over the server's socket."""
        return self._run(
            "psql",
            "-h",
            str(self.folder),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        )

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            )
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"postgres not ready after {timeout_s} s")

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then the folder is removed."""
        self.process.send_signal(2)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
