"""MLflow tracking: where runs go, what they are tagged with, and how they are written.

The tracking URI comes from `MLFLOW_TRACKING_URI`, else `sqlite:///<project root>/mlflow.db` (the file
store is deprecated). The project root is the repository root, also when DVC runs a queued experiment in
a temporary copy under `.dvc/tmp/exps/` (`mdkat.io.project_root`); the experiment is created with its
artifact location at `<project root>/mlruns` for the same reason, except on a tracking server, which stores
artifacts itself. An HTTP tracking server is asked for `/health` with a
short timeout first: the client's own retries take minutes.

Runs are written through `MlflowClient` with explicit run ids (no global active run), so a training run,
its evaluation in another process, and the nested trial runs of a study never step on each other.
`Tracker.ending()` ends a run FINISHED, FAILED or KILLED, in one place for every kind of run. Passwords
in URLs are replaced by `***` (`mdkat.redact`) before anything is logged.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdkat.config import Params, chosen_flat_dict
from mdkat.errors import MdkatError
from mdkat.io import project_root
from mdkat.redact import basic_auth, redact

STORE = "mlflow.db"  # the default store, at the project root
DATASET_DIGEST = 32  # hex characters of a split's SHA-256: MLflow stores at most 36
# a lost race is settled by the next attempt; more runs at once may need a few (MLflow's own model registry
# retries a model version lost to such a race 3 times: CREATE_MODEL_VERSION_RETRIES)
DATASET_RACE_RETRIES = 3

# Every HTTP call MLflow makes is bounded (MLflow reads these at each request; a value the user exported
# wins): a server that answers /health but fails or hangs on its API ends a stage in well under a minute,
# where MLflow's defaults (120 s timeout, 7 retries with exponential backoff) take several.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}


def bound_http_calls() -> None:
    """Set `HTTP_LIMITS` in the environment where the user has not set them."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def server_errors(uri: str) -> Iterator[None]:
    """MLflow's and the HTTP client's exceptions as one line naming the (redacted) tracking URI."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        yield
    except (MlflowException, RequestException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MdkatError(f"MLflow tracking server {redact(uri)} failed: {redact(first)[:300]}") from None


def _on_server(method):
    """Run a `Tracker` method under `server_errors` of its URI."""

    def wrapped(self, *args, **kwargs):
        with server_errors(self.uri):
            return method(self, *args, **kwargs)

    wrapped.__name__, wrapped.__doc__ = method.__name__, method.__doc__
    return wrapped


def tracking_uri(root: str | Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI`, else the `sqlite:///.../mlflow.db` of the project at `root` (default: cwd's)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / STORE}"


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer `/health`."""
    if not uri.startswith(("http://", "https://")):
        return
    # credentials go as Basic auth, as MLflow's client sends them
    plain, headers = basic_auth(uri.rstrip("/") + "/health")
    request = urllib.request.Request(plain, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise MdkatError(
        f"MLflow tracking server {redact(uri)} is not reachable ({problem}); start it, or unset "
        "MLFLOW_TRACKING_URI to record runs in the local sqlite store"
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=project_root()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_math() -> str:
    """The math libraries torch was built with (MKL, oneDNN), from its build configuration."""
    import torch

    wanted = ("Math Kernel Library", "MKL-DNN", "oneDNN", "OpenMP")
    lines = [line.strip(" -") for line in torch.__config__.show().splitlines()]
    return "; ".join(line for line in lines if any(w in line for w in wanted))[:500]


def environment_tags() -> dict[str, str]:
    """What produced a number besides the code: library versions, the CPU and its instruction-set level, the
    math kernels of numpy and torch, torch's threads, and on CUDA the GPU, its driver and CUDA version.

    The same commit gives other bytes on another CPU (its BLAS kernel rounds differently): these tags say
    which machine a run's numbers come from.
    """
    from importlib.metadata import PackageNotFoundError, version

    import numpy as np
    import torch
    from threadpoolctl import threadpool_info

    tags = {"env.python": platform.python_version(), "env.numpy": np.__version__}
    for package in ("torch", "mlflow", "optuna", "dvc", "transformers"):
        try:
            tags[f"env.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"env.{package}"] = "not installed"
    tags["env.cpu"] = _cpu_model()
    tags["env.cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512
    tags["env.torch_threads"] = str(torch.get_num_threads())
    tags["env.torch_math"] = _torch_math()
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    tags["env.numpy_blas"] = (
        "; ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})" for i in blas)
        or "unknown"
    )
    if torch.cuda.is_available():
        tags["env.gpu"] = torch.cuda.get_device_name()
        tags["env.cuda"] = str(torch.version.cuda)
        tags["env.gpu_driver"] = _nvidia_driver()
    return tags


def _nvidia_driver() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


def run_name(params: Params) -> str:
    """A train run's name, by what ran: model, seed and the DVC experiment if any (`mdkat s1111 exp-3f2a`)."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{params.model.name} s{params.train.seed}" + (f" {experiment}" if experiment else "")


def what_tags(params: Params, variant: str | None = None) -> dict[str, str]:
    """The tags every run has, to group and filter the runs table by: model, variant, seed, data source."""
    return {
        "model": params.model.name,
        "variant": variant or params.model.name,
        "seed": str(params.train.seed),
        "data.source": params.data.source,
    }


def run_tags(manifest: Mapping[str, Any] | None = None, manifest_sha256: str | None = None) -> dict[str, str]:
    """Provenance tags: git commit and dirty flag (also as MLflow's own source tags, which the UI shows as
    Source and Created by), DVC stage / experiment, the data's identity, the environment."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    tags = {
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        "mlflow.user": _user(),
        **environment_tags(),
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags["git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    for variable in ("DVC_STAGE", "DVC_EXP_NAME"):
        if os.environ.get(variable):
            tags[variable.lower().replace("_", ".")] = os.environ[variable]
    if manifest is not None:
        tags["data.source"] = str(manifest.get("source"))
        tags["data.dataset"] = str(manifest.get("dataset"))
    if manifest_sha256:
        tags["data.manifest_sha256"] = manifest_sha256
    return tags


def flat_params(params: Params) -> dict[str, str]:
    """The run's parameters (other models' sections left out) as `section.key` -> string, redacted."""
    return {key: redact(str(value)) for key, value in chosen_flat_dict(params).items()}


def _lost_insert_race(error: Exception) -> bool:
    """Whether an MLflow error is a unique key broken by a concurrent insert (PostgreSQL, SQLite, MySQL)."""
    text = str(error)
    return getattr(error, "error_code", None) == "BAD_REQUEST" and any(
        sign in text for sign in ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry")
    )


def _create_experiment(client, name: str, location: str | None) -> str:
    """Create experiment `name`; when another process created it meanwhile (workers or ranks starting
    together on a shared server), use theirs."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


@dataclass
class Tracker:
    """One MLflow run, written by run id."""

    uri: str
    run_id: str
    experiment_id: str

    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        parent: str | None = None,
    ) -> Tracker:
        """Create a run (nested under `parent` if given) in `experiment`, with params and tags."""
        from mlflow.tracking import MlflowClient

        uri = tracking_uri()
        bound_http_calls()
        check_reachable(uri)
        with server_errors(uri):
            return cls._create(MlflowClient(uri), uri, experiment, run_name, params, tags, parent)

    @classmethod
    def _create(cls, client, uri, experiment, run_name, params, tags, parent) -> Tracker:
        from mlflow.entities import Param

        found = client.get_experiment_by_name(experiment)
        if found is None:
            # a tracking server stores artifacts itself (`--artifacts-destination`): a path on this machine
            # would be unreadable by the server and everyone else using it
            remote = uri.startswith(("http://", "https://"))
            location = None if remote else (project_root() / "mlruns").as_uri()
            experiment_id = _create_experiment(client, experiment, location)
        else:
            experiment_id = found.experiment_id
        all_tags = dict(tags)
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        tracker = cls(uri, run.info.run_id, experiment_id)
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            client.log_batch(tracker.run_id, params=items[start : start + 100], synchronous=True)
        return tracker

    @classmethod
    def attach(cls, record: str | Path) -> Tracker:
        """The run recorded in an `mlflow_run.json` (to log evaluation into the training run)."""
        try:
            info = json.loads(Path(record).read_text())
        except FileNotFoundError:
            raise MdkatError(
                f"{record}: not found; it is written by the train stage next to model.pt"
            ) from None
        uri = tracking_uri()
        bound_http_calls()
        check_reachable(uri)
        return cls(uri, info["run_id"], info["experiment_id"])

    @_on_server
    def exists(self) -> bool:
        """Whether this store holds the run (a pulled `mlflow_run.json` may name another machine's)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(self.run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    @_on_server
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
        """Log numeric values (NaN included) at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(f"{prefix}{k}", float(v), now, step or 0) for k, v in metrics.items() if v is not None
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000], synchronous=True)

    @_on_server
    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    @_on_server
    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Upload files (or folders) into the run's artifacts."""
        client = self.client
        for path in paths:
            path = Path(path)
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path)
            elif path.exists():
                client.log_artifact(self.run_id, str(path), artifact_path)

    @_on_server
    def log_datasets(self, manifest: Mapping[str, Any], data_dir: str | Path) -> None:
        """Each split of the prepared data as a dataset input (context train/valid/test), so that the runs
        table's Datasets column shows which data a run saw: named `<source>/<dataset>/<split>`, digested
        by a prefix of the split file's SHA-256 (MLflow keeps 36 characters; the full manifest hash is the
        `data.manifest_sha256` tag), profiled with its sample count."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        inputs = []
        for split, count in manifest["counts"].items():
            file = Path(data_dir).resolve() / f"{split}.npz"
            dataset = Dataset(
                name=f"{manifest.get('source')}/{manifest.get('dataset')}/{split}",
                digest=manifest["files"][file.name][:DATASET_DIGEST],
                source_type="local",
                source=json.dumps({"uri": file.as_uri()}),
                profile=json.dumps({"num_samples": count, "aligned": bool(manifest.get("aligned"))}),
            )
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", split)]))
        # MLflow's SQL store looks a dataset up and inserts it when missing in one transaction but without a
        # lock: two runs logging the same new split at once (seeds trained side by side on one server) can
        # both miss it, and the second insert breaks the unique key. That transaction is rolled back whole,
        # so asking again is safe, and then finds the dataset the other run created.
        for attempt in range(DATASET_RACE_RETRIES + 1):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as e:
                if attempt == DATASET_RACE_RETRIES or not _lost_insert_race(e):
                    raise
                time.sleep(0.2 * (attempt + 1))

    @_on_server
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """Store `data` as a JSON artifact file."""
        self.client.log_dict(self.run_id, data, artifact_file)

    @_on_server
    def reopen(self) -> None:
        """Mark a FAILED or KILLED run RUNNING again (a resumed training continues it)."""
        self.client.update_run(self.run_id, status="RUNNING")

    @_on_server
    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)

    @contextlib.contextmanager
    def ending(self, killed: tuple[type[BaseException], ...] = ()) -> Iterator[Tracker]:
        """End the run with the block: FINISHED, KILLED on Ctrl-C or one of `killed`, FAILED otherwise."""
        try:
            yield self
        except (KeyboardInterrupt, *killed):
            self.finish("KILLED")
            raise
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish()

    @contextlib.contextmanager
    def system_metrics(self, enabled: bool, resume: bool = False) -> Iterator[None]:
        """MLflow's system-metrics monitor on this run during the block (`system/*`: CPU, memory, disk,
        network, GPU through pynvml); attached by run id, since runs are not started by `mlflow.start_run`.
        Its sampling interval (10 s) follows MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL."""
        if not enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def record(self) -> dict[str, str]:
        """What `mlflow_run.json` holds (the URI redacted)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": redact(self.uri)}
