"""Shared test set-up: deterministic, quiet, small thread count."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Session fixtures shared by tests/test_cluster.py and tests/test_slurm.py (uninterrupted reference runs).
from cluster_runs import one_process, two_processes  # noqa: F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
