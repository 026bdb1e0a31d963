"""Shared fixtures: the real parameter file, shrunk for speed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mdkat.config import DataConfig, load_params

ROOT = Path(__file__).resolve().parents[1]


def small_data(**changes) -> DataConfig:
    """`params.yaml`'s data section with tiny synthetic splits, then `changes` applied."""
    data = load_params(ROOT / "params.yaml").data
    synthetic = dataclasses.replace(data.synthetic, n_train=24, n_valid=8, n_test=10)
    return dataclasses.replace(data, synthetic=synthetic, **changes)


@pytest.fixture
def root() -> Path:
    return ROOT
