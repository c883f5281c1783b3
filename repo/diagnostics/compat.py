"""The few ArviZ calls whose form differs between arviz 0.x and 1.x.

arviz 0.x (Python 3.11 here) builds an :class:`arviz.InferenceData` with
``from_dict(posterior=..., log_likelihood=..., ...)`` and reads/writes netCDF with
``from_netcdf`` / ``to_netcdf``. arviz 1.x (Python >= 3.12) has no ``from_pyro``,
takes one dict of groups in ``from_dict`` and returns an :class:`xarray.DataTree`.
Everything else in :mod:`repo.diagnostics` goes through these functions, so the
1.x path is these branches only (the installed 0.x is the tested one).
"""

from __future__ import annotations

from pathlib import Path

import arviz as az
import numpy as np

ARVIZ_MAJOR = int(az.__version__.split(".")[0])


def from_dict(groups: dict[str, dict], coords: dict, dims: dict, attrs: dict):
    """InferenceData (0.x) or DataTree (1.x) from ``{group: {variable: array}}``."""
    groups = {name: values for name, values in groups.items() if values}
    if ARVIZ_MAJOR >= 1:  # pragma: no cover - arviz 1.x is not installed here
        tree = az.from_dict(groups, coords=coords, dims=dims)
        tree.attrs.update(attrs)
        return tree
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=attrs)


def group(data, name: str):
    """The group ``name`` as an :class:`xarray.Dataset`, or None when absent."""
    if ARVIZ_MAJOR >= 1:  # pragma: no cover
        return data[name].to_dataset() if name in data.children else None
    return getattr(data, name) if name in data.groups() else None


def attrs(data) -> dict:
    """Attributes of the whole object (InferenceData.attrs, DataTree.attrs)."""
    return dict(data.attrs)


def to_netcdf(data, path: str | Path) -> None:
    """Write InferenceData / DataTree to a netCDF (HDF5) file."""
    data.to_netcdf(str(path))


def from_netcdf(path: str | Path):
    """Read what :func:`to_netcdf` wrote."""
    if ARVIZ_MAJOR >= 1:  # pragma: no cover
        import xarray as xr

        return xr.open_datatree(str(path))
    return az.from_netcdf(str(path))


def _dataset(values: np.ndarray):
    return az.convert_to_dataset({"x": np.asarray(values, dtype=np.float64)})


def rhat(values: np.ndarray) -> np.ndarray:
    """Rank-normalised split R-hat of ``(chains, draws, *shape)`` draws."""
    return np.asarray(az.rhat(_dataset(values), method="rank")["x"])


def ess_bulk(values: np.ndarray) -> np.ndarray:
    """Bulk effective sample size of ``(chains, draws, *shape)`` draws."""
    return np.asarray(az.ess(_dataset(values), method="bulk")["x"])


def ess_tail(values: np.ndarray) -> np.ndarray:
    """Tail effective sample size of ``(chains, draws, *shape)`` draws."""
    return np.asarray(az.ess(_dataset(values), method="tail")["x"])
