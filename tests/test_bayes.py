"""Full Bayes over annotator parameters: NUTS, SVI, MAP, Laplace, Rao-Blackwellisation.

Numerics are checked against closed forms (the symmetric flip's per-label
likelihood ``p eta + (1 - p)(1 - eta)``) and against simulations with known truth.
"""

import copy
import json
import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from repo.cli import main
from repo.data.simulate import simulate_labels
from repo.diagnostics.calibration import coverage_figures, coverage_study
from repo.fit import fit_noise
from repo.inference.bayes import BayesSettings, infer, summarise_draws
from repo.inference.em import fit_em
from repo.inference.laplace import observed_information
from repo.inference.nuts import DivergenceWarning, run_nuts
from repo.noise import EPS, LabelData, make_noise_model
from repo.scorers import FixedLogits

F64 = torch.float64


def beta(a, b):
    return dist.Beta(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))


def per_label(sim, k):
    data = LabelData.from_labels(sim.annotator, sim.label, num_annotators=k)
    return data, FixedLogits(torch.as_tensor(sim.scores))


def fitted(model_name, sim, k, prior=None):
    data, scorer = per_label(sim, k)
    model = make_noise_model(model_name, k, prior=prior)
    fit_em(model, scorer, data)
    return model, scorer, data


QUICK = BayesSettings(num_chains=2, warmup=100, draws=100, svi_steps=600, laplace_draws=300)


def test_nuts_intervals_are_calibrated_and_converged():
    # Must-show (the part that fits the suite's time): 50 annotators with 2,000 down to
    # 20 labels, eta ~ Beta(4, 1.5), scores ~ N(0, 3^2) given; the thresholds of the
    # 200-interval study, which benchmarks/calibration.py runs in full (4 replications).
    settings = BayesSettings(num_chains=4, warmup=100, draws=600, adapt_mass_matrix=False)
    study = coverage_study(1, settings, seed=0)
    assert study.n_labels.min() == 20 and study.n_labels.max() == 2000
    figures = coverage_figures(study)
    assert figures["intervals"] == 50
    assert figures["divergences"] == 0
    assert figures["coverage90"] >= 0.85, figures
    assert figures["max_r_hat"] <= 1.01, figures
    assert figures["min_ess_bulk"] >= 400, figures
    assert figures["em_inside90"] >= 0.85, figures


def test_laplace_information_equals_closed_form():
    # l(u) = sum_j log f_j, f_j = p_j e + (1 - p_j)(1 - e), p_j = p(z = o_j | s_j), with
    # e = EPS + (1 - 2 EPS) sigmoid(u) (eta's constraint); d2l/du2 = sum_j f''/f - (f'/f)^2,
    # f' = (2p - 1) e', e' = (1 - 2 EPS) g(1 - g), e'' = e' (1 - 2g), g = sigmoid(u).
    sim = simulate_labels(num_items=3000, num_annotators=4, shared_truth=False, seed=3)
    model, scorer, data = fitted("symmetric", sim, 4)
    _, information = observed_information(model, scorer(data), data, include_prior=False)
    e = model.eta.detach()[data.annotator[:, 0]]
    s = torch.as_tensor(sim.scores)
    p = torch.sigmoid(torch.where(data.label[:, 0] > 0.5, s, -s))
    g = (e - EPS) / (1 - 2 * EPS)
    de = (1 - 2 * EPS) * g * (1 - g)
    f = p * e + (1 - p) * (1 - e)
    second = (2 * p - 1) * de * (1 - 2 * g) / f - ((2 * p - 1) * de / f) ** 2
    expected = -data.per_annotator_sum(second.unsqueeze(-1))
    assert torch.allclose(torch.diagonal(information), expected, rtol=1e-10)
    off = information - torch.diag(torch.diagonal(information))
    assert float(off.abs().max()) == 0.0  # per-label truth: annotators independent


def test_laplace_matches_nuts_with_many_labels():
    sim = simulate_labels(num_items=4000, num_annotators=3, shared_truth=False, seed=4)
    model, scorer, data = fitted("symmetric", sim, 3, prior=beta(1.0, 1.0))
    em = summarise_draws(infer("em", model, scorer, data, QUICK))[0]
    nuts = summarise_draws(infer("nuts", model, scorer, data, QUICK))[0]
    assert np.allclose(em["eta_sd"], nuts["eta_sd"], rtol=0.25)
    assert np.allclose(em["eta"], nuts["eta"], atol=0.01)


def test_rao_blackwellised_w_is_the_average_of_closed_forms():
    sim = simulate_labels(num_items=400, num_annotators=3, shared_truth=False, seed=5)
    model, scorer, data = fitted("symmetric", sim, 3, prior=beta(2.0, 1.0))
    result = infer("nuts", model, scorer, data, QUICK)
    enumeration = result.enumeration()
    eta = result.draws.samples["eta"].reshape(-1, 3)  # every draw is used
    p_a = torch.sigmoid(torch.as_tensor(sim.scores)).numpy()
    e = eta[:, sim.annotator]
    o = sim.label
    like_a = np.where(o == 1, e, 1 - e) * p_a
    like_b = np.where(o == 1, 1 - e, e) * (1 - p_a)
    expected_q1 = (like_a / (like_a + like_b)).mean(0)
    q1 = enumeration.marginals["z"][..., 1].reshape(-1).numpy()
    assert np.allclose(q1, expected_q1, atol=1e-10)
    expected_ll = np.log(like_a + like_b)
    assert np.allclose(enumeration.log_likelihood.reshape(-1, o.size), expected_ll, atol=1e-10)


def test_map_mode_equals_map_em():
    sim = simulate_labels(num_items=2000, num_annotators=4, shared_truth=False, seed=6)
    model, scorer, data = fitted("symmetric", sim, 4, prior=beta(3.0, 1.5))
    settings = copy.deepcopy(QUICK)
    settings.svi_steps = 3000
    result = infer("map", model, scorer, data, settings)
    mode = result.point_model.eta.detach().numpy()
    assert np.allclose(mode, model.eta.detach().numpy(), atol=2e-3)


def test_svi_converges_near_the_posterior():
    sim = simulate_labels(num_items=3000, num_annotators=4, shared_truth=False, seed=7)
    model, scorer, data = fitted("symmetric", sim, 4, prior=beta(1.0, 1.0))
    settings = copy.deepcopy(QUICK)
    settings.svi_steps = 4000
    result = infer("svi", model, scorer, data, settings)
    assert result.draws.info["converged"]
    elbo = np.asarray(result.draws.info["elbo"])
    assert elbo[-100:].mean() > elbo[:100].mean()
    frame, _ = summarise_draws(result)
    assert np.allclose(frame["eta"], model.eta.detach().numpy(), atol=0.015)
    assert (frame["eta_sd"] > 0.002).all() and (frame["eta_sd"] < 0.05).all()


@pytest.mark.parametrize("name", ["symmetric", "two-coin", "spammer", "hierarchical", "boltzmann"])
def test_every_model_has_a_posterior(name):
    k = 4
    sim = simulate_labels(num_items=600, num_annotators=k, shared_truth=False, model=name, seed=8)
    prior = beta(2.0, 1.0) if name in ("symmetric", "two-coin", "spammer") else None
    model, scorer, data = fitted(name, sim, k, prior=prior)
    own = {"two-coin": ["eta_a", "eta_b"], "spammer": ["theta", "bias"], "boltzmann": ["tau"]}
    own.update({"hierarchical": ["logit_eta"], "symmetric": []})
    for method in ("em", "nuts", "svi"):
        result = infer(method, model, scorer, data, QUICK)
        frame, population = summarise_draws(result, frame_point(model, scorer, data, method))
        for parameter in ["eta", *own[name]]:
            for suffix in ("", "_mean", "_sd", "_lo90", "_hi90"):
                assert np.isfinite(frame[parameter + suffix]).all(), (method, parameter + suffix)
            assert (frame[parameter + "_lo90"] <= frame[parameter + "_hi90"]).all()
            if method == "nuts":
                assert {parameter + "_r_hat", parameter + "_ess_bulk"} <= set(frame.columns)
        assert ((frame["eta"] > 0) & (frame["eta"] < 1)).all()
        if name == "hierarchical" and method != "em":
            assert population["sigma_lo90"] < population["sigma"] < population["sigma_hi90"]


def frame_point(model, scorer, data, method):
    if method != "em":
        return None
    implied = model.implied_eta(scorer(data), data).expand_as(data.label)
    return (data.per_annotator_sum(implied) / data.label_counts()).numpy()


def test_divergences_are_counted_and_warned():
    sim = simulate_labels(num_items=500, num_annotators=3, shared_truth=False, seed=9)
    model, scorer, data = fitted("symmetric", sim, 3, prior=beta(2.0, 1.0))
    bayes = copy.deepcopy(model).bayesian()
    wild = {"step_size": 40.0, "adapt_step_size": False}
    with pytest.warns(DivergenceWarning, match="divergent"):
        draws = run_nuts(
            bayes, scorer(data), data, num_chains=2, warmup=10, draws=30, kernel_options=wild
        )
    assert draws.num_divergences > 0
    assert draws.num_divergences == int(draws.sample_stats["diverging"].sum())


def test_chains_in_processes_give_the_same_draws(monkeypatch):
    # A chain's draws depend on its seed alone, not on where it runs: in this process,
    # in forked workers (on this process's traced potential) or in fresh ones.
    sim = simulate_labels(num_items=400, num_annotators=3, shared_truth=False, seed=12)
    model, scorer, data = fitted("symmetric", sim, 3, prior=beta(2.0, 1.0))
    runs = {}
    for processes, start in ((1, None), (2, "fork"), (2, "fresh")):
        monkeypatch.setenv("REPO_WORKER_START", start or "fork")
        bayes = copy.deepcopy(model).bayesian()
        runs[start] = run_nuts(
            bayes, scorer(data), data, num_chains=2, warmup=20, draws=20, seed=5,
            chain_processes=processes,
        )  # fmt: skip
    for start in ("fork", "fresh"):
        np.testing.assert_allclose(runs[None].samples["eta"], runs[start].samples["eta"], atol=1e-6)
        assert runs[start].info["chain_processes"] == 2
    with pytest.raises(ValueError, match="chain_processes"):
        run_nuts(bayes, scorer(data), data, num_chains=2, warmup=5, draws=5, chain_processes=0)


def test_too_few_draws_or_labels_are_errors():
    sim = simulate_labels(num_items=50, num_annotators=2, shared_truth=False, seed=10)
    model, scorer, data = fitted("symmetric", sim, 2, prior=beta(2.0, 1.0))
    bayes = copy.deepcopy(model).bayesian()
    with pytest.raises(ValueError, match="too few draws per chain"):
        run_nuts(bayes, scorer(data), data, num_chains=2, warmup=10, draws=3)
    one = LabelData.from_labels(torch.tensor([0]), torch.tensor([1.0]), num_annotators=2)
    with pytest.raises(ValueError, match="too few labels for a chain"):
        run_nuts(bayes, torch.zeros(1, dtype=F64), one, num_chains=2, warmup=10, draws=10)


def test_hierarchical_map_is_refused():
    sim = simulate_labels(num_items=200, num_annotators=3, shared_truth=False, seed=11)
    model, scorer, data = fitted("hierarchical", sim, 3)
    with pytest.raises(ValueError, match="degenerate"):
        infer("map", model, scorer, data, QUICK)


def write_scored(tmp_path, seed=12, k=4, n=800):
    sim = simulate_labels(num_items=n, num_annotators=k, shared_truth=False, seed=seed)
    frame = sim.frame().rename(columns={"item": "item_id"})
    frame["annotator"] = [f"ann{a}" for a in frame["annotator"]]
    path = tmp_path / "labels.csv"
    frame[["annotator", "label", "score"]].to_csv(path, index=False)
    return path, sim


def test_cli_nuts_writes_every_summary(tmp_path, capsys):
    path, _ = write_scored(tmp_path)
    out = tmp_path / "nuts.json"
    code = main(
        ["fit-noise", str(path), "--format", "scored", "--model", "two-coin", "--method",
         "nuts", "--chains", "2", "--warmup", "100", "--draws", "100", "--seed", "3",
         "--idata", str(tmp_path / "nuts.nc"), "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    document = json.loads(out.read_text())
    assert document["method"] == "nuts"
    assert document["divergences"] == 0
    assert document["files"]["inference_data"] == "nuts.nc"
    assert document["inference"]["num_chains"] == 2
    for annotator in document["annotators"]:
        for parameter in ("eta", "eta_a", "eta_b"):
            for suffix in ("_mean", "_sd", "_lo90", "_hi90", "_r_hat", "_ess_bulk"):
                assert np.isfinite(annotator[parameter + suffix])
        for key in ("mean", "sd", "lo90", "hi90", "r_hat", "ess_bulk"):
            assert annotator[key] == annotator["eta_" + key]
        assert annotator["eta"] == annotator["eta_mean"]  # NUTS: the posterior mean
    assert all(0 <= label["w"] <= 1 for label in document["labels"])


def test_cli_em_keeps_the_estimate_and_reports_laplace(tmp_path, capsys):
    path, _ = write_scored(tmp_path)
    assert "eta_lo90" not in fit_noise(path, format="scored").annotators  # EM alone
    fit = fit_noise(path, format="scored", model="symmetric", method="em")
    assert fit.method == "em"
    row = fit.annotators.iloc[0]
    assert row["eta"] == pytest.approx(fit.noise_model.eta.detach().numpy()[0])
    assert row["eta_lo90"] < row["eta"] < row["eta_hi90"]
    assert "r_hat" not in fit.annotators
    out = tmp_path / "map.json"
    code = main(
        ["fit-noise", str(path), "--format", "scored", "--method", "map", "--prior",
         "beta:2,1", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    document = json.loads(out.read_text())
    assert document["method"] == "map" and document["divergences"] == 0


def test_cli_reports_divergences_and_bad_settings(tmp_path, capsys, monkeypatch):
    path, _ = write_scored(tmp_path, n=300)
    import repo.inference.bayes as bayes

    original = bayes.run_nuts

    def wild(*args, **kwargs):
        kwargs["kernel_options"] = {"step_size": 40.0, "adapt_step_size": False}
        return original(*args, **kwargs)

    monkeypatch.setattr(bayes, "run_nuts", wild)
    out = tmp_path / "wild.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        code = main(
            ["fit-noise", str(path), "--format", "scored", "--method", "nuts", "--chains", "2",
             "--warmup", "10", "--draws", "20", "--out", str(out)]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    document = json.loads(out.read_text())
    assert document["divergences"] > 0
    assert f"WARNING: {document['divergences']} divergent" in err
    code = main(
        ["fit-noise", str(path), "--format", "scored", "--method", "nuts", "--draws", "2",
         "--out", str(tmp_path / "x.json")]
    )  # fmt: skip
    assert code == 2
    assert "too few draws per chain" in capsys.readouterr().err
