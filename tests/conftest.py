"""Shared test set-up: every test starts from the same seeds, on one torch thread."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)  # seeds Python's random, NumPy's global generator and torch
    yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: every model and tokenizer comes from files on disk."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op torch thread. The suite's tensors are small, and on a shared
    2-core machine a second thread contending with other processes makes small
    operations an order of magnitude slower (measured: an EM fit of 6,000 labels
    took 1.8 s on one thread and 25.8 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
