"""Parameters of any shape and explicit declarations (issue 12, items 1 and 2).

GLAD (Whitehill et al., 2009: ``P(label correct) = sigmoid(alpha_k beta_i)``) has a
parameter per item: it goes through EM, MAP, Laplace, NUTS, SVI, the summaries, the
saved fit and ArviZ with dims named after its plates, and recovers a simulated
truth. The silent traps are errors or explicit: a parameter named ``eta``, a
parameter without a prior under full Bayes, MAP-EM chosen rather than inferred
from ``priors()``; and a model class defined on stdin runs in chain processes.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import repo
from repo.cli import main
from repo.diagnostics.summary import predictive_checks
from repo.fit import NoiseFit, fit_noise
from repo.inference.bayes import BayesSettings, infer, summarise_plates
from repo.inference.em import fit_em
from repo.noise import (
    GLAD,
    NOISE_MODELS,
    LabelData,
    NoiseModel,
    Sizes,
    SymmetricFlip,
    make_noise_model,
)
from repo.scorers import ClassPrior, FixedLogits

ROOT = Path(repo.__file__).resolve().parents[1]
TINY = BayesSettings(
    num_chains=2,
    warmup=30,
    draws=20,
    svi_steps=150,
    svi_draws=50,
    laplace_draws=200,
    max_tree_depth=4,
)


def glad_crowd(num_annotators=8, num_items=150, seed=0):
    """Every item labelled by every annotator; ``alpha`` from adversarial to expert,
    ``beta ~ LogNormal(0.3, 0.6)``: (table, alpha, beta, truth)."""
    rng = np.random.default_rng(seed)
    alpha = np.linspace(-0.5, 3.0, num_annotators)
    beta = np.exp(rng.normal(0.3, 0.6, num_items))
    truth = rng.random(num_items) < 0.5
    annotator = np.tile(np.arange(num_annotators), num_items)
    item = np.repeat(np.arange(num_items), num_annotators)
    correct = rng.random(annotator.size) < 1 / (1 + np.exp(-alpha[annotator] * beta[item]))
    label = np.where(correct, truth[item], ~truth[item]).astype(int)
    table = pd.DataFrame(
        {
            "annotator": [f"a{k}" for k in annotator],
            "item": [f"q{i:03d}" for i in item],
            "label": label,
        }
    )
    return table, alpha, beta, truth


@pytest.fixture(scope="module")
def crowd():
    return glad_crowd()


# -- GLAD: recovery and every method ------------------------------------------------


def test_glad_marginal_likelihood_is_the_programs(crowd):
    table = crowd[0].iloc[:160]
    fit = fit_noise(table, format="binary", model="glad", method=None, max_iter=3)
    glad, data = fit.noise_model, fit.data
    logits = fit.scorer(data).detach()
    direct = glad.marginal_log_likelihood(logits, data)
    assert torch.allclose(direct, NoiseModel.marginal_log_likelihood(glad, logits, data))


def test_glad_recovers_a_simulated_truth(crowd):
    table, alpha, beta, truth = crowd
    fit = fit_noise(table, format="binary", model="glad", method="map")
    assert fit.estimate == "map" and fit.method == "map"
    assert "optimisation" not in fit.inference  # MAP-EM's estimate is the mode
    ids = fit.annotators["id"].str[1:].astype(int).to_numpy()
    alpha_hat = fit.annotators["alpha"].to_numpy()
    assert np.corrcoef(alpha_hat, alpha[ids])[0, 1] > 0.95
    assert alpha_hat[np.argmin(alpha[ids])] < 0  # the adversary is found
    items = fit.items.set_index("id")
    beta_hat = items["beta"].to_numpy()
    order = items.index.str[1:].astype(int).to_numpy()
    assert np.corrcoef(np.log(beta_hat), np.log(beta[order]))[0, 1] > 0.3
    assert items["beta_lo90"].lt(items["beta"]).all() and items["beta"].lt(items["beta_hi90"]).all()
    p_one = items["p_1"].to_numpy()
    assert np.mean((p_one > 0.5) == truth[order]) > 0.9


@pytest.mark.parametrize("method", ["em", "map", "nuts", "nuts-unpreconditioned", "svi"])
def test_glad_runs_every_method_into_arviz(crowd, method, tmp_path):
    table = crowd[0].iloc[:200]  # 25 items, 8 annotators
    settings = TINY
    if method == "nuts-unpreconditioned":  # once lost every draw at the summaries
        method, settings = "nuts", dataclasses.replace(TINY, precondition=False)
    fit = fit_noise(table, format="binary", model="glad", method=method, bayes=settings, tol=1e-4)
    assert fit.method == method and len(fit.items) == 25
    for column in ("beta", "beta_mean", "beta_lo90", "beta_hi90"):
        assert fit.items[column].notna().all(), column
    assert {"alpha", "alpha_lo90", "eta", "eta_lo90"} <= set(fit.annotators)
    if method == "nuts":
        assert {"beta_r_hat", "beta_ess_bulk"} <= set(fit.items)
    idata = fit.to_inference_data()
    posterior = idata.posterior
    assert posterior["beta"].dims == ("chain", "draw", "item")
    assert posterior["alpha"].dims == ("chain", "draw", "annotator")
    assert list(posterior["item"].values) == fit.items["id"].tolist()
    assert list(posterior["annotator"].values) == fit.annotators["id"].tolist()
    saved = NoiseFit.load(fit.save(tmp_path / method))
    assert np.allclose(saved.items["beta"], fit.items["beta"])
    if method == "map":  # diagnose's predictive checks rebuild the model from the data
        checks = predictive_checks(idata, num_draws=10)
        assert set(checks["statistic"]) == {"agreement", "balance"}


def test_glad_from_the_command_line(crowd, tmp_path, capsys):
    path = tmp_path / "crowd.csv"
    crowd[0].iloc[:200].to_csv(path, index=False)
    out = tmp_path / "glad.json"
    code = main(
        ["fit-noise", str(path), "--format", "binary", "--model", "glad", "--method", "map",
         "--out", str(out)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "ran MAP-EM" in err
    document = json.loads(out.read_text())
    assert document["model"] == "glad" and document["estimate"] == "map"
    assert all("beta" in item for item in document["items"])
    code = main(
        ["fit-noise", str(path), "--format", "binary", "--model", "glad", "--max-iter", "3",
         "--out", str(tmp_path / "ml")]
    )  # fmt: skip
    assert code == 0 and "ran EM (maximum likelihood)" in capsys.readouterr().err


def test_glad_per_label_truth_puts_item_parameters_on_labels():
    rng = np.random.default_rng(1)
    n = 300
    table = pd.DataFrame(
        {
            "annotator": rng.integers(0, 3, n).astype(str),
            "label": rng.integers(0, 2, n),
            "score": rng.normal(0, 2, n),
        }
    )
    fit = fit_noise(table, format="scored", model="glad", method="map", bayes=TINY)
    assert len(fit.labels["beta"]) == n and (fit.labels["beta"] > 0).all()
    idata = fit.to_inference_data()
    assert idata.posterior["beta"].dims == ("chain", "draw", "item")


# -- the constructor contract ---------------------------------------------------------


def test_models_are_built_from_the_data_sizes():
    data = LabelData.from_labels([0, 1, 2, 0], [1, 0, 1, 1], [0, 0, 1, 2], shared_truth=True)
    sizes = Sizes.of(data)
    assert (sizes.annotators, sizes.items, sizes.units) == (3, 3, 3)
    glad = make_noise_model("glad", sizes, eta_init=0.8)
    assert glad.beta.shape == (3,) and glad.alpha.shape == (3,)
    assert torch.allclose(
        torch.sigmoid(glad.alpha.detach()), torch.tensor(0.8, dtype=torch.float64)
    )
    spammer = make_noise_model("spammer", sizes, eta_init=0.7)
    assert torch.allclose(spammer.theta.detach(), torch.tensor(0.7, dtype=torch.float64))
    with pytest.raises(ValueError, match="number of items"):
        make_noise_model("glad", 3)


def test_a_registered_model_needing_item_counts_runs_through_fit_noise(crowd):
    class Difficulty(GLAD):  # registered under its own name, built by GLAD's contract
        name = "difficulty"

    NOISE_MODELS["difficulty"] = Difficulty
    try:
        fit = fit_noise(crowd[0].iloc[:160], format="binary", model="difficulty", method="map")
    finally:
        del NOISE_MODELS["difficulty"]
    assert len(fit.items["beta"]) == 20 and fit.model == "difficulty"


# -- chain processes ----------------------------------------------------------------

STDIN_SCRIPT = """
import torch
import pyro.distributions as dist
from repo.inference.bayes import BayesSettings, infer
from repo.inference.em import fit_em
from repo.noise import LabelData, SymmetricFlip
from repo.scorers import FixedLogits


class MyFlip(SymmetricFlip):  # defined on stdin: no module to import it from
    name = "my-flip"


g = torch.Generator().manual_seed(0)
annotator = torch.arange(200) % 2
label = (torch.rand(200, generator=g) < 0.8).double()
data = LabelData.from_labels(annotator, label)
scorer = FixedLogits(torch.full((200,), 2.0, dtype=torch.float64))
f64 = torch.float64
model = MyFlip(2, prior=dist.Beta(torch.tensor(2.0, dtype=f64), torch.tensor(1.0, dtype=f64)))
fit_em(model, scorer, data)
settings = BayesSettings(num_chains=2, warmup=30, draws=20, chain_processes=2, jit_compile=False)
result = infer("nuts", model, scorer, data, settings)
print("chains", result.draws.num_chains, "processes", result.draws.info["chain_processes"])
"""


@pytest.mark.parametrize("start", ["fork", "fresh"])
def test_a_model_defined_on_stdin_runs_in_chain_processes(tmp_path, start):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    env["REPO_WORKER_START"] = start  # fresh: the class travels by value
    done = subprocess.run(
        [sys.executable, "-"],
        input=textwrap.dedent(STDIN_SCRIPT),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chains 2 processes 2" in done.stdout


# -- silent traps -----------------------------------------------------------------------


def test_a_parameter_named_eta_must_be_the_reliability():
    class Confused(SymmetricFlip):
        def __init__(self, k):
            super(SymmetricFlip, self).__init__(k)
            self.parameter("eta", 0.5, None)  # a global "eta" that is no reliability

    with pytest.raises(ValueError, match="reliability=True"):
        Confused(3)


def test_reported_eta_is_implied_eta_never_the_parameter_of_that_name():
    class Inverted(SymmetricFlip):
        """Declares eta its reliability but reports 1 - eta: the report must follow."""

        def implied_eta(self, logits, data):
            return 1 - self.eta.detach()[data.annotator]

    rng = np.random.default_rng(3)
    annotator = rng.integers(0, 3, 600)
    scores = rng.normal(0, 3, 600)
    truth = rng.random(600) < 1 / (1 + np.exp(-scores))
    label = np.where(rng.random(600) < 0.8, truth, ~truth).astype(float)
    data = LabelData.from_labels(annotator, label)
    scorer = FixedLogits(torch.as_tensor(scores))
    model = Inverted(3)
    fit_em(model, scorer, data)
    result = infer("em", model, scorer, data, TINY)
    tables, _ = summarise_plates(result, eta_point=1 - model.eta.detach().numpy())
    frame = tables["annotators"]
    assert np.allclose(result.eta, 1 - result.draws.samples["eta"])
    assert (frame["eta_lo90"] <= frame["eta"]).all() and (frame["eta"] <= frame["eta_hi90"]).all()
    assert (frame["eta"] < 0.5).all()


class NoPrior(SymmetricFlip):
    """A flip model with a second parameter that has no prior."""

    def __init__(self, k, prior=None):
        super().__init__(k, prior=prior)
        self.parameter("offset", 0.0, None)

    def model(self, logits, data):
        return super().model(logits + self.offset, data)


@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_a_parameter_without_a_prior_is_an_error_before_sampling(method):
    data = LabelData.from_labels([0, 1, 0, 1], [1.0, 0.0, 1.0, 1.0])
    scorer = FixedLogits(torch.ones(4, dtype=torch.float64))
    model = NoPrior(2)
    with pytest.raises(ValueError, match="prior on every parameter; none for offset"):
        infer(method, model, scorer, data, TINY)


def test_defining_priors_does_not_turn_em_into_map_em(crowd):
    table = crowd[0].iloc[:96]
    data = LabelData.from_labels(
        torch.as_tensor(table["annotator"].str[1:].astype(int).to_numpy()),
        torch.as_tensor(table["label"].to_numpy(), dtype=torch.float64),
        torch.as_tensor(table["item"].str[1:].astype(int).to_numpy()),
        shared_truth=True,
    )
    ml, map_ = (make_noise_model("glad", Sizes.of(data)) for _ in range(2))
    ml_scorer, map_scorer = ClassPrior(), ClassPrior()
    fit_em(ml, ml_scorer, data)  # GLAD declares priors; EM stays maximum likelihood
    fit_em(map_, map_scorer, data, estimate="map")
    ll_ml = ml.marginal_log_likelihood(ml_scorer(data), data)
    ll_map = map_.marginal_log_likelihood(map_scorer(data), data)
    assert float(ll_ml) > float(ll_map)  # ML has the higher likelihood
    assert float(map_.log_prior()) == 0.0  # outside estimating("map"): constructed as ML
    with map_.estimating("map"):
        assert float(map_.log_prior()) != 0.0
    fit = fit_noise(table, format="binary", model="glad", method=None, max_iter=3)
    assert fit.estimate == "ml" and fit.inference["estimate"] == "ml"


def test_the_glad_benchmark_runs_quick(tmp_path, monkeypatch):
    pytest.importorskip("crowdkit")  # the benchmark's anchor (the bench extra)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import glad

    out = tmp_path / "glad-quick.json"
    figures = glad.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert figures["quick"] and figures["crowd"]["replications"] == 1
    for tool in ("repo", "crowdkit"):
        assert 0.5 < figures[f"accuracy_{tool}"] <= 1.0
        assert figures[f"alpha_corr_{tool}"] > 0.5
