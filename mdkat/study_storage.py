"""Optuna storages named by `tune.storage`: where a study lives on disk, and the storage object to open it.

`sqlite:///PATH` and `journal:PATH` are local files, relative paths taken from the project root (also from
a DVC temporary copy, whose files are deleted with it); anything else is an RDB URL, with heartbeats so
that a dead worker's trial is failed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from mdkat.errors import MdkatError
from mdkat.io import project_root
from mdkat.redact import redact

_LOCAL = ("sqlite:///", "journal:")
# the module SQLAlchemy imports for a URL's driver -> the package that provides it
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",  # postgresql:// (SQLAlchemy 2.1's default), postgresql+psycopg://
    "psycopg2": "psycopg2-binary",  # postgresql+psycopg2://
    "MySQLdb": "mysqlclient",  # mysql://
    "pymysql": "PyMySQL",  # mysql+pymysql://
}


def storage_path(storage: str, root: str | Path | None = None) -> Path | None:
    """The file of a local storage, relative paths from the project root of `root` (default: the working
    directory's); None for a remote storage."""
    for prefix in _LOCAL:
        if storage.startswith(prefix):
            path = Path(storage.removeprefix(prefix))
            return path if path.is_absolute() else project_root(root) / path
    return None


def is_local(storage: str) -> bool:
    """Storages on this machine's disk (no heartbeats; a file lock serialises trial starts)."""
    return storage.startswith(_LOCAL)


def open_storage(storage: str, heartbeat_s: int, root: str | Path | None = None, max_retries: int = 0):
    """An Optuna storage object for a `tune.storage` string (local files are created when missing).

    An RDB storage fails the trials of a worker whose heartbeat stops and queues each again with its
    values, at most `max_retries` times (Optuna's `RetryHeartbeatStaleTrialCallback`).
    """
    import optuna

    path = storage_path(storage, root)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if path is not None:
        # a busy timeout: several local workers take turns instead of failing on "database is locked"
        return optuna.storages.RDBStorage(
            f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}}
        )
    try:
        with warnings.catch_warnings():  # heartbeats and their retry callback are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
            return optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=retry,
            )
    except ImportError as e:  # SQLAlchemy imports the database driver when the engine is made
        missing = e.name or getattr(e.__cause__, "name", None) or ""  # Optuna re-raises its own ImportError
        module = missing.split(".")[0]
        package = DRIVER_PACKAGES.get(module, module or "the database driver")
        raise MdkatError(
            f"tune.storage {redact(storage)}: its database driver '{module}' is not installed; "
            f"install it: pip install '{package}'"
        ) from None
