"""Posterior summaries, PSIS-LOO model comparison and posterior predictive checks.

* :func:`summary_table`: ArviZ's summary (mean, sd, 90% interval, ``r_hat``,
  ``ess_bulk``, ``ess_tail``) of the annotator parameters, with flags for
  ``r_hat > 1.01`` and ``ess_bulk < 400`` (Vehtari et al., 2021).
* :func:`loo` and :func:`compare_models`: PSIS-LOO (Vehtari, Gelman and Gabry,
  2017) on the pointwise *marginal* log-likelihood (latents summed out), one term
  per truth unit, and ArviZ's comparison with the standard error of each
  difference in ``elpd_loo``. Models compared must share the data and the unit
  (labels, or items under shared truth).
* :func:`predictive_checks`: replicated labels ``o_rep ~ p(o | theta_s, s)`` for a
  subset of draws (the latent truth drawn afresh, as for new labels), and for each
  annotator the observed statistic against its replicates, with the posterior
  predictive p-value ``P(T(o_rep) >= T(o))``: the agreement rate (with the sign of
  the score when scores vary by unit, else with the majority of the item's other
  labels) and the label balance (share of labels saying A).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from pyro import poutine

from repo.diagnostics import compat
from repo.diagnostics.checks import ESS_MIN, RHAT_MAX
from repo.diagnostics.compat import attrs, group
from repo.inference.draws import load_draw
from repo.inference.enumeration import local_params
from repo.noise import LabelData, Sizes, make_noise_model


def summary_table(idata, var_names: list[str] | None = None) -> pd.DataFrame:
    """ArviZ summary with ``r_hat``, ``ess_bulk``, ``ess_tail`` and flags."""
    posterior = group(idata, "posterior")
    names = var_names or [v for v in posterior.data_vars if v != "eta"] + ["eta"]
    chains = posterior.sizes["chain"]
    table = compat.summary(idata, var_names=names, kind="all" if chains > 1 else "stats")
    if chains > 1:
        table["r_hat_ok"] = table["r_hat"] <= RHAT_MAX
        table["ess_ok"] = table["ess_bulk"] >= ESS_MIN
    return table


def loo(idata) -> compat.Loo:
    """PSIS-LOO of the marginal pointwise log-likelihood (ArviZ's ``loo``)."""
    if group(idata, "log_likelihood") is None:
        raise ValueError("no log_likelihood group: write the inference data with it")
    return compat.loo(idata)


def _units(idata) -> tuple[str, int]:
    ll = group(idata, "log_likelihood")
    (name,) = list(ll.data_vars)
    return name, int(np.prod([ll.sizes[d] for d in ll[name].dims if d not in ("chain", "draw")]))


def compare_models(models: Mapping[str, object]) -> pd.DataFrame:
    """ArviZ's comparison by PSIS-LOO of noise models fitted to the same data.

    :returns: the table of :func:`repo.diagnostics.compat.compare` (``rank``,
        ``elpd_loo``, ``p_loo``, ``elpd_diff``, ``weight``, ``se``, ``dse``,
        ``warning``) ranked best first, plus ``diff_in_se`` = ``elpd_diff / dse``.
    """
    if len(models) < 2:
        raise ValueError("model comparison needs at least two fits")
    units = {name: _units(idata) for name, idata in models.items()}
    if len({u for u in units.values()}) > 1:
        described = ", ".join(f"{n}: {u[1]} x {u[0]}" for n, u in units.items())
        raise ValueError(
            f"fits are not on the same truth units and cannot be compared ({described})"
        )
    table = compat.compare(dict(models))
    with np.errstate(divide="ignore", invalid="ignore"):
        table["diff_in_se"] = table["elpd_diff"] / table["dse"]
    return table


def _rebuild(idata):
    """Labels, logits and a point model of the right class from ArviZ data."""
    constant = group(idata, "constant_data")
    observed = group(idata, "observed_data")
    info = attrs(idata)
    posterior = group(idata, "posterior")
    k = posterior.sizes["annotator"]
    shared = bool(int(info.get("shared_truth", 0)))
    data = LabelData.from_labels(
        torch.as_tensor(constant["annotator_index"].values),
        torch.as_tensor(observed["o"].values, dtype=torch.float64),
        torch.as_tensor(constant["unit_index"].values),
        shared_truth=shared,
        num_annotators=k,
    )
    logits = torch.as_tensor(constant["logit"].values, dtype=torch.float64)
    model = make_noise_model(str(info["model"]), Sizes.of(data))
    return data, logits, model, posterior


def _agreement(data: LabelData, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-annotator share of labels agreeing with the reference (see module doc)."""
    if torch.unique(logits).numel() > 1:
        reference = (logits > 0).to(labels.dtype).unsqueeze(-1).expand_as(labels)
    else:
        mask = data.mask.to(labels.dtype)
        total, count = (labels * mask).sum(-1, keepdim=True), mask.sum(-1, keepdim=True)
        others = (total - labels) / (count - 1).clamp_min(1)
        reference = (others > 0.5).to(labels.dtype) + 0.5 * (others == 0.5).to(labels.dtype)
    agree = 1 - (labels - reference).abs()
    return data.per_annotator_sum(agree) / data.label_counts().clamp_min(1)


def _balance(data: LabelData, labels: torch.Tensor) -> torch.Tensor:
    return data.per_annotator_sum(labels) / data.label_counts().clamp_min(1)


def predictive_checks(idata, num_draws: int = 200, seed: int = 0) -> pd.DataFrame:
    """Posterior predictive checks per annotator (and ``"all"``); see the module doc.

    :returns: one row per (annotator, statistic): ``observed``, ``replicated_mean``,
        ``replicated_lo90``, ``replicated_hi90`` and ``p_value``, and ``pooled``: whether
        the row pools every label (its ``annotator`` is ``"all"``, which an annotator can
        be called too: the one virtual annotator of data without annotator ids).
    """
    data, logits, model, posterior = _rebuild(idata)
    names = [v for v in posterior.data_vars if v != "eta" or "eta" in model._pyro_params]
    chains, draws = posterior.sizes["chain"], posterior.sizes["draw"]
    rng = np.random.default_rng(seed)
    picks = rng.choice(chains * draws, size=min(num_draws, chains * draws), replace=False)
    replicated = {"agreement": [], "balance": []}
    torch.manual_seed(seed)
    unconditioned = poutine.uncondition(model.model)
    with local_params(), torch.no_grad():
        for pick in picks:
            c, d = divmod(int(pick), draws)
            draw = {
                n: torch.as_tensor(posterior[n].values[c, d], dtype=torch.float64) for n in names
            }
            load_draw(model, draw)
            trace = poutine.trace(poutine.condition(unconditioned, data=draw)).get_trace(
                logits, data
            )
            o_rep = trace.nodes["o"]["value"].reshape(data.label.shape).to(torch.float64)
            o_rep = torch.where(data.mask, o_rep, torch.zeros((), dtype=torch.float64))
            replicated["agreement"].append(_agreement(data, o_rep, logits).numpy())
            replicated["balance"].append(_balance(data, o_rep).numpy())
    observed = {
        "agreement": _agreement(data, data.label, logits).numpy(),
        "balance": _balance(data, data.label).numpy(),
    }
    ids = list(map(str, posterior["annotator"].values))
    weights = data.label_counts().numpy()
    rows = []
    for statistic in ("agreement", "balance"):
        rep = np.stack(replicated[statistic])  # (draws, K)
        obs = observed[statistic]
        pooled_rep = (rep * weights).sum(-1) / weights.sum()
        pooled_obs = float((obs * weights).sum() / weights.sum())
        per_annotator = [(name, o, r, False) for name, o, r in zip(ids, obs, rep.T, strict=True)]
        for name, o, r, pooled in [*per_annotator, ("all", pooled_obs, pooled_rep, True)]:
            rows.append(
                {
                    "annotator": name,
                    "pooled": pooled,
                    "statistic": statistic,
                    "observed": float(o),
                    "replicated_mean": float(r.mean()),
                    "replicated_lo90": float(np.quantile(r, 0.05)),
                    "replicated_hi90": float(np.quantile(r, 0.95)),
                    "p_value": float((r >= o).mean()),
                }
            )
    return pd.DataFrame(rows)
