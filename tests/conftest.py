"""Shared test set-up: every test starts from the same seeds."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)  # seeds Python's random, NumPy's global generator and torch
    yield
