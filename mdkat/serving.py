"""The trained model as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(inputs)`.

MLflow's default PyTorch flavour rejects dict inputs, and a model of named modalities needs them, so the
checkpoint is wrapped in a `PythonModel`. Input: a dict of numpy arrays with the prepared format's names,
`text`, `audio`, `vision` (N, T_m, d_m) and `text_len`, `audio_len`, `vision_len` (N,); output: the
sentiment predictions (N,), float64.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

from mdkat import MODALITIES
from mdkat.data import Batch

INFER_BATCH = 256


warnings.filterwarnings(
    # MLflow asks for type hints on `predict` to validate inputs; a dict of arrays has no such hint
    "ignore",
    message=".*type hints to the `predict` method",
    category=UserWarning,
)


class SentimentModel(mlflow.pyfunc.PythonModel):
    """Loads `model.pt` from the model's artifacts and predicts sentiment from named modalities."""

    def load_context(self, context) -> None:
        from mdkat.training import model_from_file

        self.model = model_from_file(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate by them
        from mdkat.training import predict

        missing = [k for k in (*MODALITIES, *(f"{m}_len" for m in MODALITIES)) if k not in model_input]
        if missing:
            raise ValueError(f"model input lacks {missing}; expected named modalities and their lengths")
        n = len(model_input["text"])
        tensors = {k: torch.as_tensor(np.asarray(model_input[k])) for k in MODALITIES}
        lengths = {
            f"{m}_len": torch.as_tensor(np.asarray(model_input[f"{m}_len"]), dtype=torch.int64)
            for m in MODALITIES
        }
        batch = Batch(
            **{k: v.float() for k, v in tensors.items()},
            **lengths,
            label=torch.zeros(n),
            id=[str(i) for i in range(n)],
        )
        return predict(self.model, batch, INFER_BATCH)


def log_model(uri: str, run_id: str, checkpoint: str | Path) -> str:
    """Log `checkpoint` as pyfunc model `model` of run `run_id` at tracking `uri`; returns its model URI."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow suggests type hints for input validation; the input here is a dict of arrays it cannot type
        warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            # "models from code": the model is defined by a source file, never a pickled object
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"checkpoint": str(checkpoint)},
            # explicit requirements: inferring them imports and inspects the environment for minutes
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"numpy=={np.__version__}",
                "mlflow",
            ],
        )
    return info.model_uri
