"""Shared test set-up: seeds, and a quiet, deterministic torch."""

import numpy as np
import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    yield
