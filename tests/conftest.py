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
def one_thread(monkeypatch):
    """One intra-op torch thread, here and in every process a test starts (``re-po``
    commands run by the examples inherit ``OMP_NUM_THREADS``). The suite's tensors are
    small, and on a shared 2-core machine a second thread contending with other
    processes makes small operations an order of magnitude slower (measured: an EM fit
    of 6,000 labels took 1.8 s on one thread and 25.8 s on two under load;
    ``test_one_annotator_lora_runs_re_po_train_and_eval``, whose commands are
    subprocesses, 168 s with two threads each and 93 s with one, beside another job)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's ``--dist loadgroup`` (pyproject's addopts), the tests of a
    module that read one of its module-scoped fixtures (a fitted result, a trained run,
    a built wheel) run in one worker, so that the fixture is built once; every other
    test goes to whichever worker is free."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions is None:
            continue
        for name in item.fixturenames:
            defined = definitions.name2fixturedefs.get(name)
            if defined and defined[-1].scope == "module":
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
                break
