"""The one adapter between re-po and ArviZ: every ArviZ call of the package is here.

re-po runs on arviz 0.x (``InferenceData``; pip's choice on Python 3.11) and on
arviz 1.x (an :class:`xarray.DataTree`, statistics from ``arviz-stats``, plots from
``arviz-plots``; pip's choice on Python >= 3.12). The two differ in the calls used
here:

=====================  ==================================  =====================================
call                   arviz 0.x                           arviz 1.x
=====================  ==================================  =====================================
``from_dict``          one keyword per group               one dict of groups
group names            ``idata.groups()``                  ``tree.children``
``summary``            ``hdi_prob=``, ``hdi_5%``           ``ci_prob=``, ``ci_kind=``,
                       (rounded unless told)               ``hdi90_lb`` (text unless told)
``loo``                ``elpd_loo``, ``p_loo``             ``elpd``, ``p``
``compare``            ``ic="loo"``; ``elpd_diff`` >= 0    no ``ic``; ``elpd_diff`` <= 0
trace plot             ``plot_trace(compact=False)``       ``plot_trace_dist(compact=False)``
netCDF                 h5netcdf (a dependency of arviz)    xarray's writer; h5netcdf not pulled in
=====================  ==================================  =====================================

The functions below take and return the same things under both: tables with the
0.x column names and signs, :class:`Loo` for PSIS-LOO, a matplotlib figure for the
trace plot, and netCDF written and read with the ``h5netcdf`` engine (a dependency
of re-po). ArviZ is imported on first use only, so importing :mod:`repo` does not
load it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

NETCDF_ENGINE = "h5netcdf"
"""The xarray backend that writes and reads the InferenceData netCDF files."""

SUMMARY_STATS = ["mean", "sd", "hdi_5%", "hdi_95%"]
"""Columns of :func:`summary` with ``kind="stats"`` (90% highest-density interval)."""

SUMMARY_DIAGNOSTICS = ["mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat"]
"""Further columns of :func:`summary` with ``kind="all"``."""

COMPARE_COLUMNS = ["rank", "elpd_loo", "p_loo", "elpd_diff", "weight", "se", "dse", "warning"]
"""Columns of :func:`compare`."""


def arviz_major() -> int:
    """Major version of the installed arviz (read from its metadata, without importing it)."""
    return int(importlib.metadata.version("arviz").split(".")[0])


@functools.cache
def _az() -> ModuleType:
    """``import arviz``, on first use (0.x's import warns of the 1.x refactor: silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module("arviz")


# ----------------------------------------------------------------------------- data


def from_dict(groups: dict[str, dict], coords: dict, dims: dict, attrs: dict):
    """InferenceData (0.x) or DataTree (1.x) from ``{group: {variable: array}}``.

    Empty groups are left out; ``attrs`` become the attributes of the whole object.
    """
    az = _az()
    groups = {name: values for name, values in groups.items() if values}
    if arviz_major() >= 1:
        tree = az.from_dict(groups, coords=coords, dims=dims)
        tree.attrs.update(attrs)
        return tree
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=attrs)


def group_names(data) -> list[str]:
    """Names of the groups (``posterior``, ``log_likelihood``, ...) of ``data``."""
    if hasattr(data, "children"):  # DataTree
        return list(data.children)
    return list(data.groups())


def group(data, name: str):
    """The group ``name`` as an :class:`xarray.Dataset`, or None when absent."""
    if name not in group_names(data):
        return None
    if hasattr(data, "children"):
        return data[name].to_dataset()
    return getattr(data, name)


def attrs(data) -> dict:
    """Attributes of the whole object (InferenceData.attrs, DataTree.attrs)."""
    return dict(data.attrs)


def to_netcdf(data, path: str | Path) -> None:
    """Write InferenceData / DataTree to a netCDF (HDF5) file, one netCDF group per group."""
    data.to_netcdf(str(path), engine=NETCDF_ENGINE)


def from_netcdf(path: str | Path):
    """Read what :func:`to_netcdf` wrote (into memory: the file is not held open)."""
    az = _az()
    if arviz_major() >= 1:
        with az.from_netcdf(str(path), engine=NETCDF_ENGINE) as tree:
            return tree.load()
    return az.from_netcdf(str(path), engine=NETCDF_ENGINE)


# ----------------------------------------------------------------------------- statistics


def summary(data, var_names: list[str], kind: str = "all") -> pd.DataFrame:
    """Posterior summary of ``var_names``, one row per scalar (``eta[a]``, ...).

    :param kind: ``"stats"``: :data:`SUMMARY_STATS` (mean, sd, 90% HDI);
        ``"all"``: those and :data:`SUMMARY_DIAGNOSTICS` (MCSE, bulk and tail ESS,
        rank-normalised split R-hat; these need more than one chain).
    :returns: floats, unrounded, in the column order above.
    """
    if kind not in ("stats", "all"):
        raise ValueError(f"summary kind must be 'stats' or 'all', not {kind!r}")
    az = _az()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arviz_major() >= 1:
            table = az.summary(
                data, var_names=var_names, kind=kind, ci_prob=0.9, ci_kind="hdi", round_to="none"
            )
            table = table.rename(columns={"hdi90_lb": "hdi_5%", "hdi90_ub": "hdi_95%"})
        else:
            table = az.summary(data, var_names=var_names, kind=kind, hdi_prob=0.9, round_to="none")
    columns = SUMMARY_STATS + (SUMMARY_DIAGNOSTICS if kind == "all" else [])
    return table[columns].astype(np.float64)


@dataclass(frozen=True)
class Loo:
    """PSIS-LOO of one fit (Vehtari, Gelman and Gabry, 2017).

    :param elpd_loo: expected log pointwise predictive density, summed over units.
    :param se: its standard error.
    :param p_loo: effective number of parameters.
    :param pareto_k: the Pareto shape estimate of each unit's importance weights.
    :param good_k: the threshold above which a unit's estimate is unreliable
        (0.7, or less for few draws).
    """

    elpd_loo: float
    se: float
    p_loo: float
    pareto_k: np.ndarray
    good_k: float

    @property
    def warning(self) -> bool:
        """Whether any unit's Pareto k exceeds :attr:`good_k`."""
        return bool((self.pareto_k > self.good_k).any())


_UNFITTABLE_TAIL = ("All tail values are the same", "n_draws_tail must be at least 5")
"""arviz 1.x's errors for a unit whose Pareto tail cannot be fitted."""


def _loo(data):
    """ArviZ's own PSIS-LOO object of ``data`` (pointwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _az().loo(data, pointwise=True)
        except ValueError as error:
            if arviz_major() < 1 or not any(m in str(error) for m in _UNFITTABLE_TAIL):
                raise
            log_weights, pareto_k = _psis_unfittable_tails_kept(data)
            return _az().loo(data, pointwise=True, log_weights=log_weights, pareto_k=pareto_k)


def _psis_unfittable_tails_kept(data):
    """PSIS log weights and Pareto k per unit, as arviz 0.x and R's ``loo`` compute them.

    arviz 1.x refuses the whole LOO when one unit's largest importance ratios are all
    equal (its log-likelihood the same at every draw of the tail, e.g. a label the model
    is certain of). 0.x and ``loo`` keep that unit's raw normalised weights with
    ``k = inf`` (flagged, not smoothed): so here, unit by unit. The relative efficiency
    is arviz's (mean ``ess(method="mean")`` of the posterior over the number of draws).
    """
    import xarray as xr
    from scipy.special import logsumexp

    (log_lik,) = group(data, "log_likelihood").data_vars.values()
    sample = ["chain", "draw"]
    units = [d for d in log_lik.dims if d not in sample]
    num_samples = log_lik.sizes["chain"] * log_lik.sizes["draw"]
    posterior = group(data, "posterior")
    reff = 1.0
    if posterior.sizes["chain"] > 1:
        ess = _az().ess(posterior, method="mean")
        reff = float(np.mean(np.hstack([ess[v].values.ravel() for v in ess.data_vars])))
        reff /= num_samples
    stacked = log_lik.stack(__unit__=units).transpose("__unit__", *sample)
    weights, ks = [], []
    for i in range(stacked.sizes["__unit__"]):
        one = stacked.isel(__unit__=i, drop=True)
        try:
            lw, k = one.azstats.psislw(r_eff=reff, dim=sample)
            weights.append(lw.values)
            ks.append(float(k))
        except ValueError as error:
            if not any(m in str(error) for m in _UNFITTABLE_TAIL):
                raise
            ratios = -one.values
            weights.append(ratios - logsumexp(ratios))
            ks.append(np.inf)
    log_weights = stacked.copy(data=np.stack(weights)).unstack("__unit__")
    pareto_k = xr.DataArray(np.array(ks), dims="__unit__", coords={"__unit__": stacked.__unit__})
    return log_weights.transpose(*log_lik.dims), pareto_k.unstack("__unit__")


def _as_loo(elpd) -> Loo:
    if arviz_major() >= 1:
        total, p = elpd.elpd, elpd.p
    else:
        total, p = elpd.elpd_loo, elpd.p_loo
    good_k = getattr(elpd, "good_k", None)
    return Loo(
        elpd_loo=float(total),
        se=float(elpd.se),
        p_loo=float(p),
        pareto_k=np.asarray(elpd.pareto_k, dtype=np.float64).ravel(),
        good_k=0.7 if good_k is None else float(good_k),
    )


def loo(data) -> Loo:
    """PSIS-LOO of ``data``'s (single) log-likelihood variable."""
    return _as_loo(_loo(data))


def compare(models: dict[str, object]) -> pd.DataFrame:
    """PSIS-LOO comparison of fits to the same data, best first (stacking weights).

    :returns: one row per model, columns :data:`COMPARE_COLUMNS`: ``elpd_diff``
        is the best model's ``elpd_loo`` minus this one's (0 for the best, >= 0),
        ``dse`` its standard error, ``warning`` whether any Pareto k is too large.
    """
    elpds = {name: _loo(data) for name, data in models.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arviz_major() >= 1:
            table = _az().compare(elpds, round_to="none")
            table = table.rename(columns={"elpd": "elpd_loo", "p": "p_loo"})
            table["elpd_diff"] = -table["elpd_diff"]
        else:
            table = _az().compare(elpds, ic="loo")
    table["warning"] = [_as_loo(elpds[name]).warning for name in table.index]
    table = table[COMPARE_COLUMNS].astype({"rank": int, "warning": bool})
    float_columns = [c for c in COMPARE_COLUMNS if c not in ("rank", "warning")]
    return table.astype(dict.fromkeys(float_columns, np.float64))


def _dataset(values: np.ndarray):
    return _az().convert_to_dataset({"x": np.asarray(values, dtype=np.float64)})


def rhat(values: np.ndarray) -> np.ndarray:
    """Rank-normalised split R-hat of ``(chains, draws, *shape)`` draws."""
    return np.asarray(_az().rhat(_dataset(values), method="rank")["x"])


def ess_bulk(values: np.ndarray) -> np.ndarray:
    """Bulk effective sample size of ``(chains, draws, *shape)`` draws."""
    return np.asarray(_az().ess(_dataset(values), method="bulk")["x"])


def ess_tail(values: np.ndarray) -> np.ndarray:
    """Tail effective sample size of ``(chains, draws, *shape)`` draws."""
    return np.asarray(_az().ess(_dataset(values), method="tail")["x"])


# ----------------------------------------------------------------------------- plots


def plot_trace(data, var_name: str, coords: dict[str, list]):
    """Density (left) and trace (right) of ``var_name`` per chain, one row per
    element of ``coords``, divergences marked; returns the matplotlib figure."""
    az = _az()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arviz_major() >= 1:
            plots = az.plot_trace_dist(
                data, var_names=[var_name], coords=coords, compact=False, backend="matplotlib"
            )
            return plots.viz["figure"].item()
        axes = az.plot_trace(data, var_names=[var_name], coords=coords, compact=False)
    return np.asarray(axes).ravel()[0].figure
