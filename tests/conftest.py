"""Shared fixtures: the real parameter file, shrunk for speed; temporary MLflow stores; one torch thread."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mdkat.config import DataConfig, Params, load_params

ROOT = Path(__file__).resolve().parents[1]

# params.yaml shrunk to seconds per training: tiny splits, narrow models, four epochs
TINY = [
    "data.synthetic.n_train=48",
    "data.synthetic.n_valid=16",
    "data.synthetic.n_test=20",
    "data.synthetic.dims.text=24",
    "data.seq_len=12",
    "model.mdkat.width=16",
    "model.mdkat.heads=2",
    "model.late_fusion.width=16",
    "model.late_fusion.heads=2",
    "train.epochs=4",
    "train.batch_size=16",
    "train.patience=10",
]


def tiny_params(*overrides: str) -> Params:
    """`params.yaml` with TINY, then `overrides`."""
    return load_params(ROOT / "params.yaml", [*TINY, *overrides])


def prepared(params: Params, folder: Path) -> Path:
    """`params.data` written as the prepare stage would, into `folder/prepared`."""
    from mdkat.data.prepare import prepare

    prepare(params.data, folder / "prepared")
    return folder / "prepared"


def section(name: str, **changes):
    """Model `name`'s config from `params.yaml`'s `model.<name>` section, with top-level keys replaced."""
    from mdkat.models import REGISTRY

    raw = load_params(ROOT / "params.yaml").model.sections()[name]
    return REGISTRY[name].Config.model_validate({**raw, **changes})


def section_weights(name: str) -> dict[str, float]:
    """Model `name`'s loss weights in `params.yaml` (none for a model with the task term only)."""
    return load_params(ROOT / "params.yaml").weights(name)


def small_data(**changes) -> DataConfig:
    """`params.yaml`'s data section with tiny synthetic splits, then `changes` applied."""
    data = load_params(ROOT / "params.yaml").data
    synthetic = data.synthetic.model_copy(update={"n_train": 24, "n_valid": 8, "n_test": 10})
    return data.model_copy(update={"synthetic": synthetic, **changes})


class Stop(Exception):
    """What a test raises from `fit`'s `on_epoch` to end a run as an interruption would."""


def stop_after(epoch: int, then=None):
    """An `on_epoch` callback that calls `then` (the caller's own callback) and interrupts the run after
    `epoch`: that epoch's checkpoint is saved by then, as when a process is killed between epochs."""

    def callback(done: int, row: dict) -> None:
        if then is not None:
            then(done, row)
        if done >= epoch:
            raise Stop(done)

    return callback


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_test_process():
    """Under pytest-xdist every core already runs a test process: a second torch (OpenMP) thread in each
    only oversubscribes the cores, and OpenMP's spinning then makes training several times slower (the CI
    profile trained in 403 s instead of 50 s). Subprocesses that tests start inherit the limit."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds barriers, and when the other core is busy (another
    test process) OpenMP's spinning makes every operator orders of magnitude slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite database for the tests to copy: migrating one takes seconds."""
    from mlflow.tracking import MlflowClient  # here: importing MLflow costs seconds a test process

    folder = tmp_path_factory.mktemp("empty-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # the default experiment's artifact root is taken from the cwd
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def use_store(folder: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> str:
    """Make `folder` the project root and the cwd, with its own sqlite MLflow store; return its URI.

    An empty dvc.yaml makes it the project root, so relative stores and mlruns/ land there, never in the
    repository's.
    """
    (folder / "dvc.yaml").touch()
    shutil.copyfile(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(folder)
    # tags depend on these; a test run inside a DVC experiment must not see its own stage's values
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return uri


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> str:
    """This test's tracking URI: a fresh sqlite store in tmp_path, which is also the project root."""
    return use_store(tmp_path, monkeypatch, empty_store)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of this test session, on loopback (tests/postgres.py); stopped at the end."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()
