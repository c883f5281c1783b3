"""NUTS over annotator parameters with the discrete latents enumerated out.

Given fixed logits ``s`` (a scorer's, held at their values), the target is the
posterior of the continuous parameters ``theta`` (annotator parameters and, for the
hierarchical model, ``mu`` and ``sigma``)::

    p(theta | o) ∝ p(theta) prod_i sum_{z_i} p(z_i | s_i) prod_j p(o_ij | z_i, theta)

Pyro builds the potential energy ``-log p(theta | o)`` (in unconstrained
coordinates, log-Jacobian included) from the noise model itself: sites marked
``infer={"enumerate": "parallel"}`` are summed out exactly by variable elimination,
so NUTS never sees a discrete variable (:class:`CachedEnumEvaluator`: Pyro's
evaluator, with the factors that do not depend on ``theta`` computed once). With
``jit_compile`` the potential is traced once by the PyTorch JIT, its constant
operations folded (:func:`traced_potential`).

Chains run one after the other (or ``chain_processes`` at a time, each in its own
process on one thread, :mod:`repo.inference.processes`; ``"auto"``: one process per
chain up to the cores this process may use). Forked workers (Linux) run on the
potential this process traced; fresh ones (elsewhere) are sent the model by value,
so a class defined in a script, a notebook or on stdin works, and build their own.
Chain ``c`` is seeded with ``seed + c`` and started from the point estimate (when
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
from pyro.infer import MCMC, NUTS, config_enumerate
from pyro.infer.mcmc.util import TraceEinsumEvaluator, _PEMaker, initialize_model
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

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


class CountingNUTS(NUTS):
    """Pyro's NUTS that counts each iteration's leapfrog steps (``num_steps``): its
    tree depth is ``ceil(log2(num_steps + 1))``, as Stan reports ``treedepth__``."""

    num_steps = 0

    def sample(self, params):
        self.num_steps = 0
        return super().sample(params)

    def _build_basetree(self, *args, **kwargs):
        self.num_steps += 1
        return super()._build_basetree(*args, **kwargs)


class PreconditionedNUTS(CountingNUTS):
    """NUTS whose diagonal inverse mass matrix starts at given values.

    :param inverse_mass: site name -> unconstrained variances (the site's shape),
        e.g. from the Laplace approximation at the EM estimate; sites not given
        start at 1. With ``adapt_mass_matrix=False`` warm-up only tunes the step size.
    """

    def __init__(self, *args, inverse_mass: dict[str, Tensor], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.initial_inverse_mass = inverse_mass

    def _initialize_adapter(self) -> None:
        super()._initialize_adapter()
        adapter = self._adapter.mass_matrix_adapter
        current = dict(adapter.inverse_mass_matrix)
        for sites, matrix in current.items():
            if matrix.dim() != 1:  # dense blocks keep Pyro's start
                continue
            parts = []
            for name in sites:
                ones = torch.ones_like(self.initial_params[name]).reshape(-1)
                value = self.initial_inverse_mass.get(name)
                parts.append(ones if value is None else value.reshape(-1).to(ones))
            current[sites] = torch.cat(parts)
        adapter.inverse_mass_matrix = current
        if self._adapter.adapt_step_size:
            self._adapter.reset_step_size_adaptation(self._initial_params)


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


def _kernel(potential_fn, transforms, options: dict, inverse_mass: dict | None) -> NUTS:
    options = dict(options, potential_fn=potential_fn, transforms=transforms)
    if inverse_mass:
        return PreconditionedNUTS(inverse_mass=inverse_mass, **options)
    return CountingNUTS(**options)


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


def _potential(
    bayes_model: NoiseModel, logits: Tensor, data: LabelData, jit_compile: bool, num_chains: int = 1
):
    """Initial values (a leading chain dim), potential energy and transforms of
    ``p(theta | o)``: Pyro's ``initialize_model`` for the start and the transforms,
    the potential from :class:`CachedEnumEvaluator` (discrete sites enumerated out)."""
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
    if jit_compile:
        return initial, traced_potential(maker._potential_fn, point), transforms
    return initial, maker.get_potential_fn(False), transforms


def traced_potential(potential_fn, point: dict[str, Tensor]):
    """``potential_fn`` (site name -> unconstrained value, to the potential energy)
    traced once at ``point`` by :func:`torch.jit.trace` into a graph of tensor
    operations, with the operations that depend on no input folded into constants
    (TorchScript's constant propagation and dead-code elimination: a Pyro program
    recomputes, e.g., its plates' index ranges and the enumerated values at every
    call). Pyro's ``jit_compile`` traces the same function at its first call,
    without the folding."""
    names = sorted(point)

    def flat(*values: Tensor) -> Tensor:
        return potential_fn(dict(zip(names, values, strict=True)))

    example = tuple(point[name].detach() for name in names)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(flat, example, check_trace=False)
    graph = traced.graph
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)

    def potential(params: dict[str, Tensor]) -> Tensor:
        return traced(*(params[name] for name in names))

    return potential


def _run_chain(
    potential_fn,
    transforms,
    initial: dict[str, Tensor],
    *,
    seed: int,
    warmup: int,
    draws: int,
    options: dict,
    inverse_mass: dict | None,
    progress: bool,
) -> tuple[dict[str, np.ndarray], dict[str, list[float]], float, float]:
    """One chain: its draws, per-draw statistics, and warm-up and sampling seconds."""
    pyro.set_rng_seed(seed)
    kernel = _kernel(potential_fn, transforms, options, inverse_mass)
    record: dict[str, list[float]] = {
        "diverging": [], "lp": [], "step_size": [], "n_steps": [], "tree_depth": []
    }  # fmt: skip
    clock = {"start": time.perf_counter(), "sampling": None}

    def hook(kernel, params, stage, i):
        if stage != "Sample":
            return
        if clock["sampling"] is None:
            clock["sampling"] = time.perf_counter()
        diverged = len(kernel._divergences) > sum(record["diverging"])
        record["diverging"].append(float(diverged))
        record["lp"].append(-float(kernel._potential_energy_last))
        record["step_size"].append(float(kernel.step_size))
        record["n_steps"].append(float(kernel.num_steps))
        record["tree_depth"].append(float(np.ceil(np.log2(kernel.num_steps + 1))))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        mcmc = MCMC(
            kernel,
            num_samples=draws,
            warmup_steps=warmup,
            initial_params=initial,
            transforms=transforms,
            hook_fn=hook,
            disable_progbar=not progress,
        )
        mcmc.run()
    end = time.perf_counter()
    first = clock["sampling"] or end
    samples = {k: v.detach().numpy().astype(np.float64) for k, v in mcmc.get_samples().items()}
    return samples, record, first - clock["start"], end - first


def _chain_forked(potential_fn, transforms, job: tuple[dict, dict]) -> tuple:
    """A chain in a forked worker, on the potential this process built: ``job`` is the
    chain's start and its :func:`_run_chain` keywords."""
    torch.set_num_threads(1)  # one core per chain
    start, chain = job
    return _run_chain(potential_fn, transforms, start, **chain)


def _chain_in_process(job: dict) -> tuple:
    """A chain in a fresh worker process: the potential is built (and traced) there."""
    torch.set_num_threads(1)  # one core per chain
    with local_params():
        _, potential_fn, transforms = _potential(
            job["model"], job["logits"], job["data"], job["jit_compile"]
        )
        return _run_chain(potential_fn, transforms, job["initial"], **job["chain"])


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
        inverse mass matrix at (:class:`PreconditionedNUTS`).
    :param adapt_mass_matrix: adapt the mass matrix in warm-up windows (Stan's
        schedule); without it warm-up tunes only the step size.
    :param kernel_options: further keyword arguments of :class:`pyro.infer.NUTS`
        (e.g. ``step_size``, ``adapt_step_size``, ``adapt_mass_matrix``).
    :param chain_processes: chains run at once, each in its own process on one
        thread (1: one after another in this process; ``"auto"``:
        :func:`resolve_chain_processes`). A chain's draws depend only on its seed,
        so the result does not depend on this number.
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
        initial, potential_fn, transforms = _potential(
            bayes_model, logits, data, jit_compile, num_chains
        )
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
        starts = [{k: v[chain] for k, v in initial.items()} for chain in range(num_chains)]
        options = dict(
            target_accept_prob=target_accept,
            max_tree_depth=max_tree_depth,
            adapt_mass_matrix=adapt_mass_matrix,
            **(kernel_options or {}),
        )
        jobs = [
            {
                "seed": seed + chain,
                "warmup": warmup,
                "draws": draws,
                "options": options,
                "inverse_mass": inverse_mass,
                "progress": progress,
            }
            for chain in range(num_chains)
        ]
        seconds = {"setup": time.perf_counter() - start, "warmup": 0.0, "sampling": 0.0}
        if chain_processes == 1:
            results = [
                _run_chain(potential_fn, transforms, chain_start, **job)
                for chain_start, job in zip(starts, jobs, strict=True)
            ]
        elif default_start() == "fork":  # the workers inherit the traced potential
            chain = partial(_chain_forked, potential_fn, transforms)
            results = map_in_processes(
                chain,
                list(zip(starts, jobs, strict=True)),
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
                    "initial": chain_start,
                    "chain": job,
                }
                for chain_start, job in zip(starts, jobs, strict=True)
            ]
            results = map_in_processes(
                _chain_in_process,
                payloads,
                chain_processes,
                start="fresh",
                meanwhile=_warm_diagnostics,
            )
    for _, _, warmup_s, sampling_s in results:
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
