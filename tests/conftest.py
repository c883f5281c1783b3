"""Shared test set-up: every test starts from the same seeds."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)  # seeds Python's random, NumPy's global generator and torch
    yield


@pytest.fixture
def one_thread():
    """One intra-op torch thread: small tensors on a shared 2-core machine run faster
    without thread oversubscription (used by the Bayesian tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
