"""The MLflow model registry: every trained model a new version, the evaluated one `candidate`, the best
one on the same data `champion`.

`train` registers its pyfunc model under `mlflow.registered_model` as a new version tagged with its run,
model, seed and data (`data.manifest_sha256`); `evaluate` points the alias `candidate` at it. Promotion is
a deliberate step:

    python -m mdkat.registry promote --data data/prepared        # --metric mae by default

points `champion` at the version with the best validation metric (`best_valid_<metric>` of its run) among
the versions trained on the same data, so that `mlflow.pyfunc.load_model("models:/mdkat@champion")` serves it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from mdkat.errors import MdkatError
from mdkat.metrics import BY_NAME, METRIC_NAMES
from mdkat.tracking import server_errors, tracking_uri

CANDIDATE, CHAMPION = "candidate", "champion"


def register(uri: str, name: str, model_uri: str, run_id: str, tags: Mapping[str, str]) -> str:
    """A new version of registered model `name` for the logged model `model_uri`; returns the version."""
    import mlflow

    with server_errors(uri):
        mlflow.set_tracking_uri(uri)
        version = mlflow.register_model(model_uri, name, tags={"run_id": run_id, **tags})
    return str(version.version)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    """Point `alias` of registered model `name` at `version`."""
    from mlflow.tracking import MlflowClient

    with server_errors(uri):
        MlflowClient(uri).set_registered_model_alias(name, alias, version)


def promote(uri: str, name: str, manifest_sha256: str, metric: str = "mae") -> str:
    """Point `champion` at the version with the best validation `metric` among those trained on the data
    of `manifest_sha256`; returns that version."""
    from mlflow.tracking import MlflowClient

    with server_errors(uri):
        client = MlflowClient(uri)
        scored = []
        for version in client.search_model_versions(f"name = '{name}'"):
            if version.tags.get("data.manifest_sha256") != manifest_sha256:
                continue
            value = client.get_run(version.run_id).data.metrics.get(f"best_valid_{metric}")
            if value is not None:
                scored.append((value, int(version.version)))
        if not scored:
            raise MdkatError(
                f"registered model {name!r} has no version trained on data {manifest_sha256[:12]}... with a "
                f"best_valid_{metric}: train one first"
            )
        lower = BY_NAME[metric].lower_is_better
        # ties go to the newer version
        value, best = (
            min(scored, key=lambda s: (s[0], -s[1])) if lower else max(scored, key=lambda s: (s[0], s[1]))
        )
        client.set_registered_model_alias(name, CHAMPION, str(best))
    print(f"{name} version {best} is {CHAMPION} (best_valid_{metric} {value:.4f})", file=sys.stderr)
    return str(best)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mdkat.registry promote --data DIR [--metric mae] [--params params.yaml]`."""
    parser = argparse.ArgumentParser(prog="python -m mdkat.registry", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    promote_cmd = commands.add_parser("promote", help="point champion at the best version on this data")
    promote_cmd.add_argument("--data", required=True, help="prepared data directory the versions must match")
    promote_cmd.add_argument("--metric", default="mae", choices=METRIC_NAMES)
    promote_cmd.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from mdkat.config import load_params
    from mdkat.data.prepared import manifest_digest

    params = load_params(args.params)
    try:
        promote(
            tracking_uri(),
            params.mlflow.registered_model,
            manifest_digest(args.data),
            args.metric,
        )
    except (MdkatError, FileNotFoundError) as e:
        print(f"mdkat registry: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
