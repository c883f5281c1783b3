"""NUTS over annotator parameters with the discrete latents enumerated out.

Given fixed logits ``s`` (a scorer's, held at their values), the target is the
posterior of the continuous parameters ``theta`` (annotator parameters and, for the
hierarchical model, ``mu`` and ``sigma``)::

    p(theta | o) ∝ p(theta) prod_i sum_{z_i} p(z_i | s_i) prod_j p(o_ij | z_i, theta)

Pyro builds the potential energy ``-log p(theta | o)`` (in unconstrained
coordinates, log-Jacobian included) from the noise model itself: sites marked
``infer={"enumerate": "parallel"}`` are summed out exactly by variable elimination,
so NUTS never sees a discrete variable (:class:`CachedEnumEvaluator`: Pyro's
evaluator, with the factors that do not depend on ``theta`` computed once).

The sampler is Pyro's NUTS algorithm run on a batch of chains at once
(:mod:`repo.inference.batched_nuts`): with ``jit_compile`` the potential and its
gradient of every chain of a batch are one call of one compiled graph. The chains
are split into ``chain_processes`` batches, each in its own process on one thread
(:mod:`repo.inference.processes`; ``"auto"``: as many as the cores this process may
use, at most one per chain; 1: one batch in this process). Forked workers (Linux)
run on the potentials this process compiled; fresh ones (elsewhere) are sent the
model by value, so a class defined in a script, a notebook or on stdin works, and
build their own. Chain ``c`` is seeded with ``seed + c`` and started from the point estimate (when
given) jittered by ``Normal(0, init_jitter^2)`` in unconstrained space, else
uniformly in ``(-2, 2)`` there (Pyro's default).
Divergent transitions after warm-up are recorded per draw, never dropped.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from functools import partial

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.mcmc.util import TraceEinsumEvaluator, _PEMaker, initialize_model
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from repo.inference.batched_nuts import BatchedNUTS, BatchedPotential
from repo.inference.draws import PosteriorDraws
from repo.inference.enumeration import MAX_PLATE_NESTING, BroadcastLogRing, local_params
from repo.inference.processes import default_start, map_in_processes
from repo.noise.base import NoiseModel
from repo.noise.layout import LabelData

MIN_DRAWS = 4
"""Split R-hat halves every chain: fewer draws than this cannot be diagnosed."""


INIT_BOUND = 6.0
"""Chains start within ``[-6, 6]`` in unconstrained space: an estimate on the boundary
(``eta = 1 - EPS`` is 13.8 on the logit scale) is pulled in to where the mass is."""


class DivergenceWarning(UserWarning):
    """NUTS reported divergent transitions: the posterior summaries may be biased."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_chain_processes(chain_processes: int | str, num_chains: int) -> int:
    """The number of chain processes: ``"auto"`` is one per chain, at most
    :func:`available_cores` (1: the chains run one after another in this process)."""
    if chain_processes == "auto":
        return max(1, min(num_chains, available_cores()))
    if isinstance(chain_processes, str) or chain_processes < 1:
        raise ValueError(f"chain_processes must be >= 1 or 'auto', got {chain_processes!r}")
    return chain_processes


def check_sampler_settings(num_chains: int, warmup: int, draws: int, data: LabelData) -> None:
    """Raise ValueError for settings or data a chain cannot be run or diagnosed on."""
    if num_chains < 1:
        raise ValueError(f"need at least one chain, got num_chains={num_chains}")
    if draws < MIN_DRAWS:
        raise ValueError(
            f"too few draws per chain ({draws}): split R-hat and ESS need >= {MIN_DRAWS}"
        )
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if data.num_labels < 2:
        raise ValueError(
            f"too few labels for a chain: {data.num_labels} label(s); the posterior would "
            "be the prior"
        )


class CachedEnumEvaluator(TraceEinsumEvaluator):
    """``log p(theta, o)`` of an enumerated model trace, with the discrete sites summed
    out; Pyro's :class:`~pyro.infer.mcmc.util.TraceEinsumEvaluator` with two changes
    that leave the value unchanged:

    * factors that do not depend on ``theta`` (with the logits held fixed, the truth
      prior ``log p(z_i | s_i)`` at the enumerated values) are computed once, on a
      probe trace whose parameters require grad, and reused (under ``jit_compile``
      they become constants of the traced graph);
    * the sum over the enumerated values is :class:`BroadcastLogRing`'s direct
      ``logsumexp`` of the broadcast log-terms, not the log-space einsum (which
      exponentiates, multiplies and takes a custom-gradient log).
    """

    def __init__(self, model_trace, has_enumerable_sites: bool, max_plate_nesting: int):
        super().__init__(model_trace, has_enumerable_sites, max_plate_nesting)
        symbols = getattr(model_trace, "plate_to_symbol", {})  # set when enumerated
        self.sizes = {
            symbols[frame.name]: frame.size
            for site in model_trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized and frame.name in symbols
        }
        self.constant: dict[str, Tensor] = {}

    def _sites(self, model_trace):
        return [
            (name, site)
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not isinstance(site["fn"], _Subsample)
        ]

    def probe(self, model_trace) -> None:
        """Record the factors of ``model_trace`` (run with parameters that require
        grad) that do not depend on the parameters."""
        model_trace.compute_log_prob()
        model_trace.pack_tensors()
        self.constant = {}
        for name, site in self._sites(model_trace):
            if not site["log_prob"].requires_grad:
                term = site["packed"]["log_prob"]
                self.constant[name] = term.detach()
                self.constant[name]._pyro_dims = term._pyro_dims

    def _get_log_factors(self, model_trace):
        model_trace.compute_log_prob(lambda name, site: name not in self.constant)
        model_trace.symbolize_dims()
        log_probs: OrderedDict[frozenset, list[Tensor]] = OrderedDict()
        for name, site in self._sites(model_trace):
            term = self.constant.get(name)
            if term is None:
                term = packed.pack(site["log_prob"], site["infer"]["_dim_to_symbol"])
            log_probs.setdefault(self.ordering[name], []).append(term)
        return log_probs

    def log_prob(self, model_trace) -> Tensor:
        """``log p(theta, o)`` of ``model_trace``, the enumerated sites summed out."""
        if not self.has_enumerable_sites:
            return super().log_prob(model_trace)
        log_probs = self._get_log_factors(model_trace)
        ring = BroadcastLogRing(dim_to_size=dict(self.sizes))
        return contract_to_tensor(log_probs, self._enum_dims, ring=ring)


def _potential(bayes_model: NoiseModel, logits: Tensor, data: LabelData, num_chains: int = 1):
    """Initial values (a leading chain dim), potential energy and transforms of
    ``p(theta | o)``: Pyro's ``initialize_model`` for the start and the transforms,
    the potential (one chain) from :class:`CachedEnumEvaluator` (discrete sites
    enumerated out)."""
    args = (logits, data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        initial, _, transforms, prototype = initialize_model(
            bayes_model,
            args,
            max_plate_nesting=MAX_PLATE_NESTING,
            num_chains=num_chains,
        )
    if num_chains == 1:  # Pyro adds the chain dimension only for several chains
        initial = {k: v.unsqueeze(0) for k, v in initial.items()}
    # the program initialize_model runs: discrete sites enumerated in parallel
    enumerated = poutine.enum(
        config_enumerate(bayes_model), first_available_dim=-1 - MAX_PLATE_NESTING
    )
    sites = prototype.iter_stochastic_nodes()
    discrete = any(site["fn"].has_enumerate_support for _, site in sites)
    evaluator = CachedEnumEvaluator(prototype, discrete, MAX_PLATE_NESTING)
    point = {k: v[0].detach().requires_grad_() for k, v in initial.items()}
    constrained = {k: transforms[k].inv(v) for k, v in point.items()}
    evaluator.probe(poutine.trace(poutine.condition(enumerated, constrained)).get_trace(*args))
    maker = _PEMaker(enumerated, args, {}, evaluator, transforms)
    return initial, maker.get_potential_fn(False), transforms


def batched_potential(
    potential_fn, initial: dict[str, Tensor], batches: list[list[int]], jit_compile: bool
) -> BatchedPotential:
    """The batched potential, compiled under ``jit_compile`` and checked at the starts
    of each batch of chains (indices into ``initial``'s chain dim), which compiles its
    graph for each batch size here."""
    point = {k: v[batches[0][0]].detach() for k, v in initial.items()}
    potential = BatchedPotential(potential_fn, point, compile=jit_compile)
    for chains in batches:
        potential.check(potential.flatten({k: v[chains] for k, v in initial.items()}))
    return potential


SAMPLER_OPTIONS = ("step_size", "adapt_step_size", "adapt_mass_matrix")
"""The ``kernel_options`` :class:`~repo.inference.batched_nuts.BatchedNUTS` takes."""


def _run_chains(
    potential: BatchedPotential,
    transforms,
    start: dict[str, Tensor],
    *,
    seeds: list[int],
    warmup: int,
    draws: int,
    options: dict,
    inverse_mass: dict | None,
    progress: bool,
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, float]]:
    """The chains of one batch (``start``: their unconstrained starts, a leading chain
    dim): each chain's constrained draws, per-draw statistics, and the batch's warm-up
    and sampling seconds."""
    mass = None
    if inverse_mass:  # sites not given start at 1
        mass = torch.cat(
            [
                torch.as_tensor(inverse_mass[name], dtype=torch.float64).reshape(-1)
                if name in inverse_mass
                else torch.ones(size, dtype=torch.float64)
                for name, size in zip(potential.names, potential.sizes, strict=True)
            ]
        )
    sampler = BatchedNUTS(potential, seeds, inverse_mass=mass, **options)
    run = sampler.run(potential.flatten(start), warmup, draws, progress=progress)
    values = potential.unflatten(run["samples"])
    constrained = {k: transforms[k].inv(v).detach().numpy() for k, v in values.items()}
    return [
        (
            {k: v[c] for k, v in constrained.items()},
            {k: v[c] for k, v in run["stats"].items()},
            run["warmup"],
            run["sampling"],
        )
        for c in range(len(seeds))
    ]


def _chains_forked(potential: BatchedPotential, transforms, job: tuple) -> list:
    """A batch of chains in a forked worker, on the potential this process compiled:
    ``job`` is the batch's starts and its :func:`_run_chains` keywords."""
    torch.set_num_threads(1)  # one core per batch
    start, batch = job
    return _run_chains(potential, transforms, start, **batch)


def _chains_in_process(job: dict) -> list:
    """A batch of chains in a fresh worker process: the potential is built (and
    compiled) there."""
    torch.set_num_threads(1)  # one core per batch
    with local_params():
        _, potential_fn, transforms = _potential(job["model"], job["logits"], job["data"])
        start = job["start"]
        chains = list(range(len(job["batch"]["seeds"])))
        potential = batched_potential(potential_fn, start, [chains], job["jit_compile"])
        return _run_chains(potential, transforms, start, **job["batch"])


def _sampler_options(kernel_options: dict) -> dict:
    """``kernel_options`` checked against :data:`SAMPLER_OPTIONS`."""
    unknown = sorted(set(kernel_options) - set(SAMPLER_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown NUTS kernel option(s) {', '.join(unknown)}; the sampler takes "
            f"{', '.join(SAMPLER_OPTIONS)}"
        )
    return dict(kernel_options)


def _warm_diagnostics() -> None:
    """Import ArviZ, which the R-hat and ESS of the summaries need next (seconds of
    imports), while the chains run in worker processes and this one would be idle."""
    from repo.diagnostics.compat import _az

    _az()


def run_nuts(
    bayes_model: NoiseModel,
    logits: Tensor,
    data: LabelData,
    *,
    num_chains: int = 4,
    warmup: int = 500,
    draws: int = 500,
    seed: int = 0,
    jit_compile: bool = True,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    init: dict[str, Tensor] | None = None,
    init_jitter: float = 0.5,
    inverse_mass: dict[str, Tensor] | None = None,
    adapt_mass_matrix: bool = True,
    kernel_options: dict | None = None,
    chain_processes: int | str = 1,
    progress: bool = False,
) -> PosteriorDraws:
    """Sample ``p(theta | o)`` by NUTS; see the module docstring.

    :param bayes_model: a noise model after :meth:`NoiseModel.bayesian`.
    :param logits: ``(I,)`` fixed preference logits of the truth units.
    :param init: point values (constrained) by site name to start the chains near.
    :param inverse_mass: unconstrained variances by site name to start the diagonal
        inverse mass matrix at (e.g. the Laplace approximation's at the estimate;
        sites not given start at 1).
    :param adapt_mass_matrix: adapt the mass matrix in warm-up windows (Stan's
        schedule); without it warm-up tunes only the step size.
    :param jit_compile: run the potential and its gradient as one compiled graph
        over the batch (:class:`~repo.inference.batched_nuts.BatchedPotential`);
        without it, Pyro's potential and autograd chain by chain (slow; for a model
        whose potential cannot be traced).
    :param kernel_options: ``step_size`` (the initial step size), ``adapt_step_size``
        or ``adapt_mass_matrix`` of :class:`~repo.inference.batched_nuts.BatchedNUTS`.
    :param chain_processes: processes the chains are split over, each batch of
        chains run at once in its own process on one thread (1: all in this
        process; ``"auto"``: :func:`resolve_chain_processes`). A chain's draws
        depend only on its seed, so the result does not depend on this number.
    :returns: draws ``(num_chains, draws, ...)`` with per-draw ``diverging``,
        ``lp`` (log density in unconstrained space), ``step_size``, ``n_steps``
        (leapfrog steps) and ``tree_depth``.
    """
    check_sampler_settings(num_chains, warmup, draws, data)
    bayes_model.check_bayesian()
    chain_processes = resolve_chain_processes(chain_processes, num_chains)
    logits = logits.detach()
    start = time.perf_counter()
    pyro.set_rng_seed(seed)
    with local_params():
        initial, potential_fn, transforms = _potential(bayes_model, logits, data, num_chains)
        if init:
            generator = torch.Generator().manual_seed(seed)
            for name, value in init.items():
                if name in transforms:
                    centre = transforms[name](torch.as_tensor(value, dtype=torch.float64))
                    centre = centre.clamp(-INIT_BOUND, INIT_BOUND)
                    noise = torch.randn(
                        (num_chains, *centre.shape), generator=generator, dtype=torch.float64
                    )
                    initial[name] = centre + init_jitter * noise
        options = {"max_tree_depth": max_tree_depth, "target_accept": target_accept}
        options["adapt_mass_matrix"] = adapt_mass_matrix
        options.update(_sampler_options(kernel_options or {}))
        batches = [
            chains.tolist()
            for chains in np.array_split(np.arange(num_chains), min(chain_processes, num_chains))
        ]
        jobs = [
            (
                {k: v[chains] for k, v in initial.items()},
                {
                    "seeds": [seed + chain for chain in chains],
                    "warmup": warmup,
                    "draws": draws,
                    "options": options,
                    "inverse_mass": inverse_mass,
                    "progress": progress,
                },
            )
            for chains in batches
        ]
        if chain_processes == 1 or default_start() == "fork":
            # compiled here for each batch size; forked workers inherit it
            potential = batched_potential(potential_fn, initial, batches, jit_compile)
        seconds = {"setup": time.perf_counter() - start, "warmup": 0.0, "sampling": 0.0}
        if chain_processes == 1:
            chain_start, batch = jobs[0]
            grouped = [_run_chains(potential, transforms, chain_start, **batch)]
        elif default_start() == "fork":
            grouped = map_in_processes(
                partial(_chains_forked, potential, transforms),
                jobs,
                chain_processes,
                start="fork",
                meanwhile=_warm_diagnostics,
            )
        else:
            payloads = [
                {
                    "model": bayes_model,
                    "logits": logits,
                    "data": data,
                    "jit_compile": jit_compile,
                    "start": chain_start,
                    "batch": batch,
                }
                for chain_start, batch in jobs
            ]
            grouped = map_in_processes(
                _chains_in_process,
                payloads,
                chain_processes,
                start="fresh",
                meanwhile=_warm_diagnostics,
            )
    results = [chain for batch in grouped for chain in batch]
    for (_, _, warmup_s, sampling_s), *_ in grouped:
        seconds["warmup"] += warmup_s
        seconds["sampling"] += sampling_s
    seconds["total"] = time.perf_counter() - start
    samples = {name: np.stack([r[0][name] for r in results]) for name in results[0][0]}
    stats = [r[1] for r in results]
    sample_stats = {key: np.array([s[key] for s in stats], dtype=np.float64) for key in stats[0]}
    sample_stats["diverging"] = sample_stats["diverging"].astype(bool)
    for key in ("n_steps", "tree_depth"):
        sample_stats[key] = sample_stats[key].astype(np.int64)
    result = PosteriorDraws(
        method="nuts",
        samples=samples,
        sample_stats=sample_stats,
        seconds=seconds,
        info={
            "num_chains": num_chains,
            "chain_processes": min(chain_processes, num_chains),
            "warmup": warmup,
            "draws": draws,
            "seed": seed,
            "jit_compile": jit_compile,
            "target_accept": target_accept,
            "max_tree_depth": max_tree_depth,
            "adapt_mass_matrix": adapt_mass_matrix,
            "preconditioned": bool(inverse_mass),
        },
    )
    if result.num_divergences:
        warnings.warn(
            f"NUTS: {result.num_divergences} divergent transition(s) after warm-up "
            f"(of {num_chains * draws} draws); the summaries may be biased",
            DivergenceWarning,
            stacklevel=2,
        )
    return result
