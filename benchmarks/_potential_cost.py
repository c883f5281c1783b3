"""What one potential-and-gradient call of a batch of chains costs, with and without
``jit_compile`` (:class:`repo.inference.batched_nuts.BatchedPotential`), beside
Pyro's own potential (``initialize_model``'s, autograd) called chain by chain."""

from __future__ import annotations

import time
import warnings
from functools import partial

from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad

from repo.inference.bayes import bayesian_copy
from repo.inference.enumeration import MAX_PLATE_NESTING, local_params
from repo.inference.nuts import _potential, batched_potential


def _per_call_ms(function, repeats: int) -> float:
    function()  # warm
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return 1000 * (time.perf_counter() - start) / repeats


def potential_cost(model, logits, data, chains: int, repeats: int = 20) -> dict:
    """Milliseconds per call for ``chains`` chains: ``pyro_ms`` (Pyro's potential,
    one chain after another), ``uncompiled_ms`` and ``compiled_ms`` (the batch NUTS
    runs, without and with ``jit_compile``), ``compile_s`` (building the compiled
    batch, imports included when first) and ``speedup`` (uncompiled over compiled)."""
    bayes = bayesian_copy(model)
    batch = list(range(chains))
    out = {"chains": chains}
    with local_params(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initial, potential_fn, _ = _potential(bayes, logits, data, chains)
        _, pyros, _, _ = initialize_model(
            bayes, (logits, data), max_plate_nesting=MAX_PLATE_NESTING
        )
        points = [{k: v[c].clone() for k, v in initial.items()} for c in batch]
        out["pyro_ms"] = _per_call_ms(
            lambda: [potential_grad(pyros, point) for point in points], repeats
        )
        for jit in (False, True):
            start = time.perf_counter()
            potential = batched_potential(potential_fn, initial, [batch], jit)
            z = potential.flatten(initial)
            potential(z)
            if jit:
                out["compile_s"] = time.perf_counter() - start
            out["compiled_ms" if jit else "uncompiled_ms"] = _per_call_ms(
                partial(potential, z), repeats
            )
    out["speedup"] = out["uncompiled_ms"] / out["compiled_ms"]
    return out
