"""What a trained model's result depends on, as one comparable record and its hash.

A run's identity is its parameters (the `data`, `model`, `loss` and `train` sections as the chosen model
reads them; not where it runs or is tracked), the SHA-256 of the prepared data's manifest, and a digest of
the code that shapes a run. Checkpoints carry it, so that a resume never continues another configuration
(`mdkat.training.fit`), and the report's results carry its hash, so that a result never outlives what
made it (`mdkat.report`).
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

from mdkat.config import ADDED_UNSET, Params, chosen_flat_dict

# what a run's result depends on; tune/mlflow/report/ci settings do not change a trained model
_RUN_SECTIONS = ("data", "model", "loss", "train")
# the code that shapes every run and its numbers (relative to the package): a committed run never outlives it
_RUN_CODE = (
    "training.py",
    "distributed.py",  # what ranks exchange under torchrun (the models import it too)
    "data/batch.py",
    "data/synthetic.py",
    "metrics.py",
    "evaluation.py",
    "diagnose.py",
    "models/__init__.py",  # the registry and `build`; read, not followed (it imports every model)
    "models/bert.py",  # `build` wraps any model in it when model.text_encoder is bert
)
_MODELS = "mdkat.models"


def code_digest(model: str | None = None) -> str:
    """SHA-256 over the code that shapes a run of `model`, in a fixed order: `_RUN_CODE` and the model's
    module with every module of `mdkat.models` it imports, directly or not (every model when None).

    The code, not the text: each file's syntax tree without its docstrings, so that a comment or a
    docstring edited does not throw an hour of results away, and any change of what runs does. Per model,
    so that a change to one baseline retrains that baseline, not the whole models table.
    """
    package = Path(__file__).parent
    if model is None:
        models = set((package / "models").glob("*.py"))
    else:
        from mdkat.models import REGISTRY  # here: the registry imports every model (torch)

        models = model_files(package, REGISTRY[model].__module__)
    files = sorted({package / entry for entry in _RUN_CODE} | models)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(package).as_posix().encode() + b"\0" + _code(f.read_text()) + b"\0")
    return digest.hexdigest()


def model_files(package: Path, module: str) -> set[Path]:
    """The file of `module` (a `mdkat.models` submodule) and of every submodule it imports, transitively."""
    found: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = package.parent / (name.replace(".", "/") + ".py")
        if path in found or not path.is_file() or name == _MODELS:
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == _MODELS:  # from mdkat.models import x
                todo += [f"{_MODELS}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(_MODELS + "."):
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith(_MODELS + ".")]
    return found


def _code(source: str) -> bytes:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = body[1:] or [ast.Pass()]  # the docstring, not the code
    return ast.dump(tree, annotate_fields=False).encode()


def identity(params: Params, manifest_sha256: str, code: str | None = None) -> dict[str, Any]:
    """{"params": dotted values, "data": manifest SHA-256, "code": `code_digest` of its model} of one run."""
    relevant = {
        k: v
        for k, v in chosen_flat_dict(params).items()
        if k.split(".", 1)[0] in _RUN_SECTIONS and not (k in ADDED_UNSET and v is None)
    }
    relevant.pop("train.device", None)  # a GPU run answers the same question
    return {"params": relevant, "data": manifest_sha256, "code": code or code_digest(params.model.name)}


def fingerprint(params: Params, manifest_sha256: str, code: str | None = None) -> str:
    """A hash of `identity`: its parameters, the data and the code."""
    text = json.dumps(identity(params, manifest_sha256, code), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two identities, one line each: `key: saved -> now`."""
    lines = []
    before, after = saved.get("params", {}), now.get("params", {})
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<absent>") != after.get(key, "<absent>"):
            lines.append(f"{key}: {before.get(key, '<absent>')!r} -> {after.get(key, '<absent>')!r}")
    if saved.get("data") != now.get("data"):
        lines.append(
            f"data (manifest SHA-256): {str(saved.get('data'))[:12]}... -> {str(now.get('data'))[:12]}..."
        )
    if saved.get("code") != now.get("code"):
        lines.append("code: the models, the training loop or the data code changed since the checkpoint")
    return lines
