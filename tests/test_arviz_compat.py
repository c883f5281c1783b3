"""The ArviZ adapter (repo.diagnostics.compat) under whichever arviz is installed.

CI runs the suite on Python 3.11 (arviz 0.x) and 3.12 (arviz 1.x), so both branches of
every function are exercised there; the expectations here are the same for both.
"""

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr
from scipy.special import logsumexp

from repo.diagnostics import compat

CHAINS, DRAWS, UNITS = 4, 250, 40
ANNOTATORS = ["a", "b", "c"]


def make_data(seed=0, shift=0.0, chains=CHAINS):
    """Independent normal draws of ``eta`` (3 annotators) and ``mu``, a pointwise
    log-likelihood ``o`` over 40 labels, observed and constant data."""
    rng = np.random.default_rng(seed)
    groups = {
        "posterior": {
            "eta": rng.normal([0.6, 0.7, 0.8], 0.05, size=(chains, DRAWS, 3)),
            "mu": rng.normal(1.0, 2.0, size=(chains, DRAWS)),
        },
        "sample_stats": {"diverging": np.zeros((chains, DRAWS), dtype=bool)},
        "log_likelihood": {"o": rng.normal(-0.7 + shift, 0.05, size=(chains, DRAWS, UNITS))},
        "observed_data": {"o": rng.integers(0, 2, UNITS)},
        "constant_data": {},
    }
    dims = {"eta": ["annotator"], "o": ["label"]}
    coords = {"annotator": ANNOTATORS, "label": np.arange(UNITS)}
    attrs = {"model": "symmetric", "method": "nuts", "shared_truth": 0}
    return compat.from_dict(groups, coords=coords, dims=dims, attrs=attrs), groups


def test_arviz_major_is_the_installed_version():
    import arviz

    assert compat.arviz_major() == int(arviz.__version__.split(".")[0])
    assert compat.arviz_major() == int(importlib.metadata.version("arviz").split(".")[0])


def test_importing_the_package_does_not_import_arviz():
    code = (
        "import importlib, pkgutil, sys, repo\n"
        "for module in pkgutil.walk_packages(repo.__path__, 'repo.'):\n"
        "    importlib.import_module(module.name)\n"
        "assert 'arviz' not in sys.modules, 'imported with the package'\n"
        "import numpy as np\n"
        "from repo.diagnostics.compat import rhat\n"
        "rhat(np.zeros((2, 10)) + np.arange(10))\n"
        "assert 'arviz' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_dict_groups_dims_coords_and_attrs():
    data, groups = make_data()
    assert set(compat.group_names(data)) == {
        "posterior",
        "sample_stats",
        "log_likelihood",
        "observed_data",
    }  # the empty constant_data is left out
    assert compat.group(data, "constant_data") is None
    posterior = compat.group(data, "posterior")
    assert isinstance(posterior, xr.Dataset)
    assert posterior["eta"].dims == ("chain", "draw", "annotator")
    assert list(posterior["annotator"].values) == ANNOTATORS
    assert np.array_equal(posterior["mu"].values, groups["posterior"]["mu"])
    assert compat.group(data, "log_likelihood")["o"].dims == ("chain", "draw", "label")
    assert compat.attrs(data) == {"model": "symmetric", "method": "nuts", "shared_truth": 0}


def test_netcdf_round_trip(tmp_path):
    data, groups = make_data()
    path = tmp_path / "fit.nc"
    compat.to_netcdf(data, path)
    back = compat.from_netcdf(path)
    assert set(compat.group_names(back)) == set(compat.group_names(data))
    for name in ("posterior", "log_likelihood", "observed_data", "sample_stats"):
        assert compat.group(back, name).equals(compat.group(data, name)), name
    stored = compat.attrs(back)
    assert stored["model"] == "symmetric" and stored["method"] == "nuts"
    assert int(stored["shared_truth"]) == 0
    path.unlink()  # read into memory: the file is not held open
    assert compat.group(back, "posterior")["eta"].values.shape == (CHAINS, DRAWS, 3)


def test_the_netcdf_engine_is_a_declared_dependency():
    # arviz 1.x no longer brings h5netcdf (nor h5py, which it needs): re-po declares both
    importlib.metadata.version(compat.NETCDF_ENGINE)
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    names = {re.split(r"[<>=!~\[ ;]", r)[0] for r in project["project"]["dependencies"]}
    assert {compat.NETCDF_ENGINE, "h5py"} <= names, names


def test_summary_columns_and_values():
    data, groups = make_data()
    table = compat.summary(data, var_names=["mu", "eta"])
    assert list(table.columns) == compat.SUMMARY_STATS + compat.SUMMARY_DIAGNOSTICS
    assert list(table.index) == ["mu", "eta[a]", "eta[b]", "eta[c]"]
    assert (table.dtypes == np.float64).all()  # arviz 1.x rounds to text unless told
    eta = groups["posterior"]["eta"].reshape(-1, 3)
    assert np.allclose(table.loc[["eta[a]", "eta[b]", "eta[c]"], "mean"], eta.mean(0))
    assert np.allclose(table.loc[["eta[a]", "eta[b]", "eta[c]"], "sd"], eta.std(0), rtol=1e-2)
    # a 90% interval: about 5% of the draws below it and 5% above
    below = (eta < table.loc[["eta[a]", "eta[b]", "eta[c]"], "hdi_5%"].to_numpy()).mean(0)
    above = (eta > table.loc[["eta[a]", "eta[b]", "eta[c]"], "hdi_95%"].to_numpy()).mean(0)
    assert np.allclose(below + above, 0.1, atol=0.01)
    # independent draws: R-hat near 1, ESS near the number of draws
    assert table["r_hat"].between(0.99, 1.01).all()
    assert table["ess_bulk"].between(0.7 * CHAINS * DRAWS, 1.3 * CHAINS * DRAWS).all()


def test_summary_stats_only():
    data, _ = make_data(chains=1)
    table = compat.summary(data, var_names=["eta"], kind="stats")
    assert list(table.columns) == compat.SUMMARY_STATS
    with pytest.raises(ValueError, match="summary kind"):
        compat.summary(data, var_names=["eta"], kind="diagnostics")


def test_loo_of_a_nearly_constant_log_likelihood():
    data, groups = make_data()
    result = compat.loo(data)
    ll = groups["log_likelihood"]["o"].reshape(-1, UNITS)
    # with draws this alike, LOO is the log pointwise predictive density less p_loo
    lppd = float((logsumexp(ll, axis=0) - np.log(ll.shape[0])).sum())
    assert result.p_loo == pytest.approx(ll.var(0, ddof=1).sum(), rel=0.05)
    assert result.elpd_loo == pytest.approx(lppd - result.p_loo, abs=0.01)
    assert 0 < result.se < 1
    assert result.pareto_k.shape == (UNITS,)
    assert 0.5 <= result.good_k <= 0.7
    assert result.warning is False


def test_compare_ranks_the_better_fit_first_with_positive_differences():
    better, _ = make_data(seed=1, shift=0.1)
    worse, _ = make_data(seed=2)
    table = compat.compare({"worse": worse, "better": better})
    assert list(table.columns) == compat.COMPARE_COLUMNS
    assert list(table.index) == ["better", "worse"]
    assert list(table["rank"]) == [0, 1]
    elpd = {
        name: compat.loo(data).elpd_loo for name, data in [("worse", worse), ("better", better)]
    }
    assert table.loc["worse", "elpd_loo"] == pytest.approx(elpd["worse"])
    assert table.loc["better", "elpd_diff"] == 0
    assert table.loc["worse", "elpd_diff"] == pytest.approx(elpd["better"] - elpd["worse"])
    assert table.loc["worse", "dse"] > 0
    assert table["weight"].sum() == pytest.approx(1.0)
    assert table["warning"].dtype == bool and not table["warning"].any()


def test_rhat_and_ess_of_draw_arrays():
    rng = np.random.default_rng(3)
    mixed = rng.normal(size=(4, 500, 2))
    assert np.allclose(compat.rhat(mixed), 1, atol=0.01)
    assert (compat.ess_bulk(mixed) > 1500).all() and (compat.ess_tail(mixed) > 1000).all()
    stuck = mixed + np.arange(4)[:, None, None]  # each chain in its own place
    assert (compat.rhat(stuck) > 1.5).all()
    assert (compat.ess_bulk(stuck) < 100).all()


def test_plot_trace_draws_density_and_trace_per_annotator():
    data, _ = make_data()
    figure = compat.plot_trace(data, "eta", {"annotator": ["a", "c"]})
    assert isinstance(figure, plt.Figure)
    drawn = [ax for ax in figure.axes if ax.lines]
    assert len(drawn) == 2 * 2  # (density, trace) for each of the two annotators
    assert all(len(ax.lines) >= CHAINS for ax in drawn)
    plt.close(figure)


@pytest.mark.parametrize("constant", ["every draw", "the tail"])
def test_loo_keeps_a_unit_whose_tail_cannot_be_fitted(constant):
    # arviz 1.x raises for such a unit; 0.x (and R's loo) flag it with k = inf and keep
    # its raw weights, whose LOO term is then the unit's log-likelihood itself
    data, groups = make_data()
    ll = groups["log_likelihood"]["o"].copy()
    if constant == "every draw":
        ll[..., 0] = -0.5
    else:  # most draws exactly 0, a few a rounding error above
        rng = np.random.default_rng(5)
        ll[..., 0] = np.where(rng.random(ll.shape[:2]) < 0.9, 0.0, 1e-12)
    posterior = groups["posterior"]
    full = compat.from_dict(
        {"posterior": posterior, "log_likelihood": {"o": ll}}, {}, {"o": ["label"]}, {}
    )
    rest = compat.from_dict(
        {"posterior": posterior, "log_likelihood": {"o": ll[..., 1:]}}, {}, {"o": ["label"]}, {}
    )
    result, others = compat.loo(full), compat.loo(rest)
    assert result.pareto_k[0] == np.inf and np.isfinite(result.pareto_k[1:]).all()
    assert result.warning is True
    assert np.allclose(result.pareto_k[1:], others.pareto_k)
    assert result.elpd_loo == pytest.approx(others.elpd_loo + ll[..., 0].mean(), abs=1e-9)
