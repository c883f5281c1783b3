"""The vectorised per-draw enumeration (traced program under vmap) against Pyro's
enumeration draw by draw, for every noise model and both truth layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repo.data.simulate import simulate_labels
from repo.inference.bayes import BayesSettings, infer
from repo.inference.draws import PosteriorDraws, enumerate_draws
from repo.inference.em import fit_em
from repo.noise import LabelData, make_noise_model
from repo.noise.base import Sizes
from repo.scorers import FixedLogits


def laplace_draws(name: str, shared_truth: bool, chains: int = 2, per_chain: int = 6):
    """EM, then Laplace draws split into ``chains`` chains: varied parameter values."""
    k = 4
    sim = simulate_labels(
        num_items=60, num_annotators=k, labels_per_item=3 if shared_truth else 1,
        shared_truth=shared_truth, model=name if name != "glad" else "symmetric", seed=5,
    )  # fmt: skip
    data = LabelData.from_labels(
        sim.annotator, sim.label, sim.item, shared_truth=shared_truth, num_annotators=k
    )
    scorer = FixedLogits(torch.as_tensor(sim.scores))
    model = make_noise_model(name, Sizes.of(data))
    fit_em(model, scorer, data, max_iter=20)
    settings = BayesSettings(laplace_draws=chains * per_chain, seed=1)
    result = infer("em", model, scorer, data, settings)
    samples = {
        key: value.reshape(chains, per_chain, *value.shape[2:])
        for key, value in result.draws.samples.items()
    }
    return result, PosteriorDraws("nuts", samples)


@pytest.mark.parametrize("shared_truth", [False, True])
@pytest.mark.parametrize(
    "name", ["symmetric", "two-coin", "spammer", "hierarchical", "boltzmann", "glad"]
)
def test_vectorised_enumeration_equals_the_per_draw_loop(name, shared_truth):
    result, draws = laplace_draws(name, shared_truth)
    args = (result.bayes_model, result.logits, result.data, draws)
    fast = enumerate_draws(*args)
    slow = enumerate_draws(*args, vectorise=False)
    assert fast.vectorised and not slow.vectorised
    assert fast.index == slow.index
    assert fast.log_likelihood.shape == (2, 6, result.data.num_units)
    np.testing.assert_allclose(fast.log_likelihood, slow.log_likelihood, rtol=1e-9, atol=1e-6)
    assert set(fast.marginals) == set(slow.marginals)
    for site, value in fast.marginals.items():
        torch.testing.assert_close(value, slow.marginals[site], rtol=1e-9, atol=1e-6)
    # the draws differ, so the pointwise log-likelihood does too (not one draw repeated)
    assert np.ptp(fast.log_likelihood[:, :, 0]) > 0


def test_vectorised_enumeration_in_chunks_and_thinned(monkeypatch):
    import repo.inference.draws as module

    result, draws = laplace_draws("two-coin", False, chains=3, per_chain=7)
    args = (result.bayes_model, result.logits, result.data, draws)
    slow = enumerate_draws(*args, max_draws=12, vectorise=False)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 5 * result.data.num_units)  # 5 draws a chunk
    fast = enumerate_draws(*args, max_draws=12)
    assert fast.vectorised and len(fast.index) == 12
    np.testing.assert_allclose(fast.log_likelihood, slow.log_likelihood, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(fast.marginals["z"], slow.marginals["z"], rtol=1e-9, atol=1e-6)


def test_a_program_that_branches_on_its_parameters_falls_back_to_the_loop():
    # The trace records one draw's branch; the check at the first and last draws
    # sees the other branch's values and every draw is enumerated by Pyro instead.
    result, draws = laplace_draws("symmetric", False)
    model = result.bayes_model
    forward = type(model).forward

    def branching(self, logits, data):
        if bool((self.eta > 0.7).all()):  # data-dependent control flow
            return forward(self, logits, data)
        return forward(self, -logits, data)

    eta = draws.samples["eta"]
    eta[0, 0] = 0.9
    eta[-1, -1] = 0.6
    model.forward = branching.__get__(model)
    args = (model, result.logits, result.data, draws)
    fast = enumerate_draws(*args)
    slow = enumerate_draws(*args, vectorise=False)
    assert not fast.vectorised
    np.testing.assert_allclose(fast.log_likelihood, slow.log_likelihood)


def test_auto_chain_processes_is_one_per_chain_up_to_the_cores(monkeypatch):
    from repo.inference import nuts

    monkeypatch.setattr(nuts, "available_cores", lambda: 2)
    assert nuts.resolve_chain_processes("auto", 4) == 2
    assert nuts.resolve_chain_processes("auto", 1) == 1
    assert nuts.resolve_chain_processes(3, 4) == 3
    monkeypatch.setattr(nuts, "available_cores", lambda: 1)
    assert nuts.resolve_chain_processes("auto", 4) == 1  # one core: in this process
    for bad in (0, "many"):
        with pytest.raises(ValueError, match="chain_processes"):
            nuts.resolve_chain_processes(bad, 4)


def test_the_cli_runs_chains_in_processes_by_default(capsys):
    from repo.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["fit-noise", "x.csv", "--format", "scored", "--method", "nuts", "--out", "o"]
    )
    assert args.chain_processes == "auto"
    args = parser.parse_args(
        ["fit-noise", "x.csv", "--format", "scored", "--out", "o", "--chain-processes", "2"]
    )
    assert args.chain_processes == 2
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["fit-noise", "x.csv", "--format", "scored", "--out", "o", "--chain-processes", "0"]
        )
    assert "expected 'auto' or a count >= 1" in capsys.readouterr().err
