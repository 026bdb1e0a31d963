"""Entry point of the logged MLflow model ("models from code"): MLflow runs this file to build the model."""

import mlflow.models

from mdkat.serving import SentimentModel

mlflow.models.set_model(SentimentModel())
