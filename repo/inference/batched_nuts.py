"""NUTS with the chains of a process batched: one trajectory step for all of them.

On a small model Pyro's :class:`~pyro.infer.mcmc.NUTS` spends more time in Python
bookkeeping and in autograd's engine than in arithmetic, once per chain and leapfrog
step. Here the ``C`` chains of a process share every step: the potential energies
``U(theta_c)`` and gradients of all ``C`` chains are one call of one compiled graph
(:class:`BatchedPotential`), and the trees are built on ``(C, D)`` tensors, each
chain masked out once its own tree stops.

Each chain's transition is Pyro's NUTS (Hoffman and Gelman, 2014; Betancourt, 2017),
step for step, with a diagonal mass matrix ``M = diag(m)^{-1}``:

* momentum ``r ~ Normal(0, M)``, energy ``H = U(theta) + r^T M^{-1} r / 2``;
* leapfrog (velocity Verlet) steps of size ``epsilon``, the trajectory doubled
  forwards or backwards at random until the no-U-turn criterion of Betancourt (2017,
  A.4.2) holds across the whole tree or a subtree, a step's energy error exceeds
  1000 (a divergence) or the depth reaches ``max_tree_depth``;
* multinomial sampling: within a subtree a state is drawn with weight
  ``exp(H_0 - H)``, and each new subtree's draw replaces the tree's with probability
  ``min(1, w_new / w_old)`` (biased progressive sampling).

Warm-up is Pyro's too: Stan's windows (:class:`~pyro.infer.mcmc.adaptation.
WarmupAdapter`'s schedule), dual averaging of ``log epsilon`` towards the target
acceptance (:class:`~pyro.ops.dual_averaging.DualAveraging`, on a vector of chains),
Welford variances of each slow window regularised as Stan's
(:class:`~pyro.ops.welford.WelfordCovariance`) as the next ``M^{-1}``, and the
step-size search of :class:`~pyro.infer.mcmc.HMC` at the start and after each window.

Chain ``c`` draws all its randomness from its own generator (seeded ``seeds[c]``):
a fixed count of numbers at every transition, and fresh momenta only for its own
step-size searches, whatever the other chains do, so its draws depend on its seed
and not on which chains share its batch.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, fields

import numpy as np
import pyro
import torch
from pyro.infer.mcmc.adaptation import WarmupAdapter
from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.integrator import potential_grad
from pyro.ops.welford import WelfordCovariance
from torch import Tensor

MAX_DELTA_ENERGY = 1000.0
"""A leapfrog step whose energy error exceeds this diverges (Pyro's and Stan's)."""

STEP_SIZE_SEARCH_THRESHOLD = math.log(0.8)
"""The step-size search doubles or halves until ``-Delta H`` crosses this (Stan's)."""

MIN_STEP_SIZE, MAX_STEP_SIZE = 1e-10, 1e10


class BatchedPotential:
    """Potential energy ``U`` and its gradient at ``C`` points at once, on flat
    ``(C, D)`` unconstrained coordinates (sites in sorted order, each flattened), and
    the leapfrog step of Hamiltonian dynamics on it with a diagonal metric.

    With ``compile`` (``jit_compile``) the potential's tensor operations are recorded
    once at ``point`` by ``make_fx`` (Pyro's plates, enumeration and evaluator run
    once, argument validation off, as under any trace). For ``n`` chains the record
    is vectorised and differentiated by :func:`torch.func.vmap` of
    :func:`torch.func.grad_and_value`, a leapfrog step is built around it, and the
    whole is recorded again and run by :func:`torch.jit.trace`: one call moves ``n``
    chains one step and returns their energies and gradients, with no autograd
    engine at run time (a graph per ``n``, built at its first use and kept, so a
    process that forks after a check hands its compiled graphs to the workers). Shapes and any
    value-dependent branches are those at ``point``, as under any trace. Without it
    each chain is one call of ``potential_fn`` and autograd (Pyro's
    ``potential_grad``).

    A call evaluates only the chains it is told are ``active`` (a batch's trees stop
    at different depths): on a large model the arithmetic, not the call, is the cost,
    and a stopped chain's would be wasted.

    :param potential_fn: site name -> unconstrained value (one chain) to ``U``.
    :param point: a value of each site (one chain): names, shapes, trace point.
    """

    def __init__(self, potential_fn, point: dict[str, Tensor], compile: bool = True) -> None:
        self.potential_fn = potential_fn
        self.names = sorted(point)
        self.shapes = [tuple(point[name].shape) for name in self.names]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.dim = sum(self.sizes)
        self.example = tuple(point[name].detach().clone() for name in self.names)
        self.compile = compile
        self.program = self._record() if compile else None
        self.graphs: dict[int, torch.jit.ScriptModule] = {}

    def _record(self):
        """The potential's tensor operations at the example point (one chain)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        def flat(*values: Tensor) -> Tensor:
            return self.potential_fn(dict(zip(self.names, values, strict=True)))

        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # a distribution built with validation on checks its sample's values: the
            # outcome at the point is read there, as a trace would, and the check's
            # operations (which feed no output) are dropped
            program = make_fx(flat, _error_on_data_dependent_ops=False)(*self.example)
        program.graph.eliminate_dead_code()
        program.recompile()
        return program

    def _graph(self, n: int):
        """The compiled leapfrog step of ``n`` chains (:meth:`leapfrog`'s arguments and
        results)."""
        if n not in self.graphs:
            from torch.func import grad_and_value, vmap
            from torch.fx.experimental.proxy_tensor import make_fx

            argnums = tuple(range(len(self.names)))
            energy_and_grad = vmap(grad_and_value(self.program, argnums=argnums))

            def potential(z: Tensor) -> tuple[Tensor, Tensor]:
                grads, energy = energy_and_grad(*self.unflatten(z).values())
                return energy, torch.cat([g.reshape(n, -1) for g in grads], -1)

            def step(z, r, grad, size, inverse_mass):
                return _velocity_verlet(potential, z, r, grad, size, inverse_mass)

            z = torch.cat([v.reshape(-1) for v in self.example]).expand(n, -1).clone()
            example = (z, torch.ones_like(z), torch.ones_like(z), z[:, :1], torch.ones_like(z))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                graph = make_fx(step)(*example)
                graph.graph.eliminate_dead_code()
                graph.recompile()
                self.graphs[n] = torch.jit.trace(graph, example, check_trace=False)
        return self.graphs[n]

    def unflatten(self, z: Tensor) -> dict[str, Tensor]:
        """``(..., D)`` flat coordinates to site name -> ``(..., *shape)``."""
        parts = z.split(self.sizes, dim=-1)
        return {
            name: part.reshape(tuple(z.shape[:-1]) + shape)
            for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
        }

    def flatten(self, values: dict[str, Tensor]) -> Tensor:
        """Site name -> ``(C, *shape)`` to flat ``(C, D)`` coordinates."""
        return torch.cat([values[name].reshape(len(values[name]), -1) for name in self.names], -1)

    def leapfrog(
        self,
        z: Tensor,
        r: Tensor,
        grad: Tensor,
        step: Tensor,
        inverse_mass: Tensor,
        active: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One velocity-Verlet step of signed size ``step`` ``(C, 1)`` from ``z``
        (momentum ``r``, ``grad`` the gradient of ``U`` there) with
        ``M^{-1} = diag(inverse_mass)``: the new ``z``, ``r``, gradient, ``U`` and
        kinetic energy ``r^T M^{-1} r / 2``. Chains not ``active`` (a ``(C,)`` mask,
        default all) are not evaluated: they keep ``z``, ``r`` and ``grad``, with
        ``U = inf``."""
        inputs = (z, r, grad, step, inverse_mass)
        if active is None or bool(active.all()):
            return self._step(*inputs)
        rows = active.nonzero().flatten()
        out = [z.clone(), r.clone(), grad.clone(), torch.full_like(z[:, 0], math.inf)]
        out.append(torch.zeros_like(z[:, 0]))
        if len(rows):
            for part, value in zip(out, self._step(*(x[rows] for x in inputs)), strict=True):
                part[rows] = value
        return tuple(out)

    def _step(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.compile:
            return self._graph(inputs[0].shape[0])(*inputs)
        return _velocity_verlet(self.uncompiled, *inputs)

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``U`` ``(C,)`` and its gradient ``(C, D)`` at ``z`` ``(C, D)`` (a step of
        size 0)."""
        zero = torch.zeros_like(z)
        _, _, grad, energy, _ = self.leapfrog(z, zero, zero, zero[:, :1], zero)
        return energy, grad

    def uncompiled(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``potential_fn`` and autograd, one chain at a time."""
        energies, gradients = [], []
        for row in z:
            point = {k: v.detach().clone() for k, v in self.unflatten(row).items()}
            grad, energy = potential_grad(self.potential_fn, point)
            energies.append(energy.detach())
            gradients.append(torch.cat([grad[name].reshape(-1) for name in self.names]))
        return torch.stack(energies), torch.stack(gradients)

    def check(self, z: Tensor) -> None:
        """Raise unless the compiled graph gives ``potential_fn``'s energies and
        gradients at ``z`` (e.g. the chains' starts)."""
        if not self.compile:
            return
        (energy, grad), (expected, expected_grad) = self(z), self.uncompiled(z)
        finite = torch.isfinite(expected)
        if not (
            torch.allclose(energy[finite], expected[finite], rtol=1e-8, atol=1e-8)
            and torch.allclose(grad[finite], expected_grad[finite], rtol=1e-6, atol=1e-8)
        ):
            raise RuntimeError(
                "the compiled potential differs from the model's at the chains' starts "
                "(a branch on parameter values?); run with jit_compile=False"
            )


def _velocity_verlet(potential, z, r, grad, step, inverse_mass):
    """``r <- r - step/2 grad U(z)``, ``z <- z + step M^{-1} r``,
    ``r <- r - step/2 grad U(z)``; also ``U`` and the kinetic energy at the end."""
    r = r - 0.5 * step * grad
    z = z + step * inverse_mass * r
    energy, grad = potential(z)
    r = r - 0.5 * step * grad
    return z, r, grad, energy, _kinetic_energy(r, inverse_mass)


def _kinetic_energy(r: Tensor, inverse_mass: Tensor) -> Tensor:
    """``r^T M^{-1} r / 2`` for each chain, ``M^{-1} = diag(inverse_mass)``."""
    return 0.5 * (r * inverse_mass * r).sum(-1)


@dataclass
class _Tree:
    """A (sub)tree of every chain: its edges ``(C, 3, D)`` (rows ``z``, ``r`` and the
    gradient of ``U``), its draw ``(C, 2, D)`` (``z`` and the gradient) with ``U``
    there, the sum of its momenta, its log weight and its statistics ``(C,)``."""

    left: Tensor
    right: Tensor
    draw: Tensor
    energy_draw: Tensor
    r_sum: Tensor
    log_weight: Tensor
    turning: Tensor
    diverging: Tensor
    sum_accept: Tensor
    num_steps: Tensor


def _pick(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Chain by chain (the leading dimension), ``a`` where ``mask`` else ``b``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


class BatchedNUTS:
    """NUTS on ``C`` chains at once; see the module docstring.

    :param potential: the chains' :class:`BatchedPotential`.
    :param seeds: one seed per chain (``C`` of them).
    :param inverse_mass: ``(D,)`` or ``(C, D)`` initial diagonal of ``M^{-1}``
        (default ones).
    :param step_size: initial step size (searched from it when adapted).
    """

    def __init__(
        self,
        potential: BatchedPotential,
        seeds: list[int],
        *,
        target_accept: float = 0.8,
        max_tree_depth: int = 10,
        step_size: float = 1.0,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        inverse_mass: Tensor | None = None,
    ) -> None:
        self.potential = potential
        self.num_chains = len(seeds)
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.target_accept = target_accept
        self.max_tree_depth = max_tree_depth
        self.adapt_step_size = adapt_step_size
        self.adapt_mass_matrix = adapt_mass_matrix
        shape = (self.num_chains, potential.dim)
        ones = torch.ones(shape, dtype=torch.float64)
        self.inverse_mass = ones if inverse_mass is None else inverse_mass.expand(shape).clone()
        self.step_size = torch.full((self.num_chains,), float(step_size), dtype=torch.float64)

    # -- randomness, chain by chain ------------------------------------------------

    def _normals(self, chains: list[int] | None = None) -> Tensor:
        """Standard normals ``(C, D)`` from each listed chain's generator (zeros for
        the others)."""
        out = torch.zeros(self.num_chains, self.potential.dim, dtype=torch.float64)
        for c in range(self.num_chains) if chains is None else chains:
            out[c] = torch.randn(self.potential.dim, generator=self.generators[c], dtype=out.dtype)
        return out

    def _uniforms(self) -> Tensor:
        """Each chain's uniforms for one transition: a direction and an acceptance per
        doubling, then one per merge inside the subtrees (indexed by the first leaf
        of the merge's second half, unique within the transition)."""
        count = 2 * self.max_tree_depth + 2**self.max_tree_depth
        return torch.stack(
            [torch.rand(count, generator=g, dtype=torch.float64) for g in self.generators]
        )

    # -- dynamics ----------------------------------------------------------------

    def _kinetic(self, r: Tensor) -> Tensor:
        return _kinetic_energy(r, self.inverse_mass)

    def _leapfrog(self, z: Tensor, r: Tensor, grad: Tensor, step: Tensor, active: Tensor):
        """One velocity-Verlet step of signed size ``step`` ``(C, 1)`` (the
        ``active`` chains only): ``z``, ``r``, gradient, ``U`` and kinetic energy."""
        return self.potential.leapfrog(z, r, grad, step, self.inverse_mass, active)

    def _turning(self, left: Tensor, right: Tensor, r_sum: Tensor) -> Tensor:
        """Betancourt (2017, A.4.2): ``rho = sum r - (r_left + r_right) / 2``; turning
        when ``M^{-1} r_left . rho <= 0`` or ``M^{-1} r_right . rho <= 0``."""
        r_left, r_right = left[:, 1], right[:, 1]
        rho = self.inverse_mass * (r_sum - (r_left + r_right) / 2)
        return ((r_left * rho).sum(-1) <= 0) | ((r_right * rho).sum(-1) <= 0)

    def _leaf(self, edge: Tensor, step: Tensor, energy_0: Tensor, idle: Tensor) -> _Tree:
        z, r, grad, energy, kinetic = self._leapfrog(
            edge[:, 0], edge[:, 1], edge[:, 2], step, ~idle
        )
        total = (energy + kinetic).nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
        delta = total - energy_0
        state = torch.stack([z, r, grad], 1)
        return _Tree(
            left=state,
            right=state,
            draw=torch.stack([z, grad], 1),
            energy_draw=energy,
            r_sum=r,
            log_weight=-delta,
            turning=torch.zeros_like(delta, dtype=torch.bool),
            diverging=delta > MAX_DELTA_ENERGY,
            sum_accept=(-delta).exp().clamp(max=1.0),
            num_steps=torch.ones_like(delta, dtype=torch.long),
        )

    def _subtree(self, edge, step, right, depth, energy_0, uniforms, offset, idle) -> _Tree:
        """A subtree of ``2**depth`` leapfrog steps from ``edge`` ``(C, 3, D)``, in the
        direction of ``step``'s sign; its leaves are numbered from ``offset`` within
        the transition. ``idle`` chains (done with their transition, or with this
        subtree) are carried along, not evaluated, and their results ignored; a chain
        whose first half turned or diverged keeps that half."""
        if depth == 0:
            return self._leaf(edge, step, energy_0, idle)
        half = self._subtree(edge, step, right, depth - 1, energy_0, uniforms, offset, idle)
        stopped = half.turning | half.diverging
        if bool((stopped | idle).all()):
            return half
        middle = offset + 2 ** (depth - 1)
        outer = _pick(right, half.right, half.left)
        other = self._subtree(
            outer, step, right, depth - 1, energy_0, uniforms, middle, idle | stopped
        )
        log_weight = torch.logaddexp(half.log_weight, other.log_weight)
        take = uniforms[:, middle] < (other.log_weight - log_weight).exp()
        left = _pick(right, half.left, other.left)
        right_edge = _pick(right, other.right, half.right)
        r_sum = half.r_sum + other.r_sum
        merged = _Tree(
            left=left,
            right=right_edge,
            draw=_pick(take, other.draw, half.draw),
            energy_draw=_pick(take, other.energy_draw, half.energy_draw),
            r_sum=r_sum,
            log_weight=log_weight,
            turning=other.turning | self._turning(left, right_edge, r_sum),
            diverging=other.diverging,
            sum_accept=half.sum_accept + other.sum_accept,
            num_steps=half.num_steps + other.num_steps,
        )
        if not bool(stopped.any()):
            return merged
        return _Tree(
            **{
                f.name: _pick(stopped, getattr(half, f.name), getattr(merged, f.name))
                for f in fields(_Tree)
            }
        )

    def transition(self, z: Tensor, energy: Tensor, grad: Tensor) -> tuple:
        """One NUTS transition of every chain from ``z`` (with ``U`` and its gradient).

        :returns: the new ``(z, U, grad)``, each chain's mean acceptance statistic over
            its tree, its leapfrog steps and whether it diverged.
        """
        depth_limit = self.max_tree_depth
        uniforms = self._uniforms()
        merge_uniforms = uniforms[:, 2 * depth_limit :]
        r = self._normals() / self.inverse_mass.sqrt()
        energy_0 = energy + self._kinetic(r)
        left = right = torch.stack([z, r, grad], 1)
        draw, energy_draw, r_sum = torch.stack([z, grad], 1), energy, r
        log_weight = torch.zeros_like(energy)
        sum_accept = torch.zeros_like(energy)
        num_steps = torch.zeros_like(energy, dtype=torch.long)
        diverging = torch.zeros_like(energy, dtype=torch.bool)
        done = torch.zeros_like(energy, dtype=torch.bool)
        offset = 1
        for depth in range(depth_limit):
            forward = uniforms[:, depth] < 0.5
            step = torch.where(forward, 1.0, -1.0).view(-1, 1) * self.step_size.view(-1, 1)
            edge = _pick(forward, right, left)
            new = self._subtree(edge, step, forward, depth, energy_0, merge_uniforms, offset, done)
            offset += 2**depth
            active = ~done
            sum_accept = sum_accept + torch.where(active, new.sum_accept, 0.0)
            num_steps = num_steps + torch.where(active, new.num_steps, 0)
            right = _pick(active & forward, new.right, right)
            left = _pick(active & ~forward, new.left, left)
            diverging = diverging | (active & new.diverging)
            going = active & ~new.turning & ~new.diverging
            chance = (new.log_weight - log_weight).exp()
            take = going & (uniforms[:, depth_limit + depth] < chance)
            draw = _pick(take, new.draw, draw)
            energy_draw = _pick(take, new.energy_draw, energy_draw)
            r_sum = _pick(going, r_sum + new.r_sum, r_sum)
            turned = going & self._turning(left, right, r_sum)
            log_weight = _pick(
                going & ~turned, torch.logaddexp(log_weight, new.log_weight), log_weight
            )
            done = done | ~going | turned
            if bool(done.all()):
                break
        accept_prob = sum_accept / num_steps
        return draw[:, 0], energy_draw, draw[:, 1], accept_prob, num_steps, diverging

    # -- warm-up -----------------------------------------------------------------

    def reasonable_step_size(self, z: Tensor, energy: Tensor, grad: Tensor) -> None:
        """Pyro's :class:`~pyro.infer.mcmc.HMC` search, chain by chain: double (or
        halve) ``epsilon`` while one step's acceptance ``exp(-Delta H)`` stays above
        (or below) 0.8, each try with a fresh momentum."""
        chains = list(range(z.shape[0]))
        step_size = self.step_size.clone()

        def direction_at(step_size: Tensor, chains: list[int]) -> Tensor:
            r = self._normals(chains) / self.inverse_mass.sqrt()
            energy_0 = energy + self._kinetic(r)
            active = torch.zeros_like(energy, dtype=torch.bool)
            active[chains] = True
            step = step_size.view(-1, 1)
            *_, energy_new, kinetic_new = self._leapfrog(z, r, grad, step, active)
            delta = energy_new + kinetic_new - energy_0
            return torch.where(STEP_SIZE_SEARCH_THRESHOLD < -delta, 1.0, -1.0)

        direction = direction_at(step_size, chains)
        searching = torch.ones_like(step_size, dtype=torch.bool)
        while True:
            searching &= (MIN_STEP_SIZE < step_size) & (step_size < MAX_STEP_SIZE)
            if not bool(searching.any()):
                break
            step_size = torch.where(searching, step_size * 2.0**direction, step_size)
            chains = searching.nonzero().flatten().tolist()
            searching &= direction_at(step_size, chains) == direction
        self.step_size = step_size.clamp(MIN_STEP_SIZE, MAX_STEP_SIZE)

    def run(self, z: Tensor, warmup: int, draws: int, progress: bool = False) -> dict:
        """Warm up, then draw: ``z`` ``(C, D)`` starts.

        :returns: ``samples`` ``(C, draws, D)``, per-draw ``stats`` ``(C, draws)``
            (``diverging``, ``lp``, ``step_size``, ``n_steps``, ``tree_depth``), and
            the seconds of ``warmup`` and ``sampling``.
        """
        num_chains = z.shape[0]
        energy, grad = self.potential(z)
        adapter = WarmupAdapter(adapt_step_size=True, adapt_mass_matrix=True)
        adapter.configure(warmup, initial_step_size=1.0, mass_matrix_shape={("z",): (1,)})
        schedule, window = adapter.adaptation_schedule, 0
        averaging = DualAveraging()
        variances = WelfordCovariance(diagonal=True)

        def restart_averaging() -> None:
            self.reasonable_step_size(z, energy, grad)
            averaging.reset()
            averaging.prox_center = torch.log(10 * self.step_size)

        if self.adapt_step_size and warmup:
            restart_averaging()
        samples = torch.empty(num_chains, draws, self.potential.dim, dtype=torch.float64)
        stats = {
            key: np.zeros((num_chains, draws))
            for key in ("diverging", "lp", "step_size", "n_steps", "tree_depth")
        }
        iterations = range(warmup + draws)
        if progress:
            from tqdm.auto import tqdm

            iterations = tqdm(iterations, desc="NUTS (batched chains)")
        start = time.perf_counter()
        sampling_start = start
        for i in iterations:
            if i == warmup:
                sampling_start = time.perf_counter()
            z, energy, grad, accept_prob, steps, diverged = self.transition(z, energy, grad)
            t = i + 1  # as Pyro's WarmupAdapter.step is called
            if t < warmup:
                mass_phase = self.adapt_mass_matrix and 0 < window < len(schedule) - 1
                if self.adapt_step_size:
                    averaging.step(self.target_accept - accept_prob)
                    self.step_size = torch.as_tensor(averaging.get_state()[0]).exp()
                if mass_phase:
                    variances.update(z)
                if t == schedule[window].end:
                    if window == len(schedule) - 1:
                        if self.adapt_step_size:
                            self.step_size = torch.as_tensor(averaging.get_state()[1]).exp()
                    elif mass_phase:
                        self.inverse_mass = variances.get_covariance(regularize=True)
                        variances.reset()
                        if self.adapt_step_size:
                            restart_averaging()
                    window += 1
            if i >= warmup:
                j = i - warmup
                samples[:, j] = z
                stats["diverging"][:, j] = diverged.numpy()
                stats["lp"][:, j] = (-energy).numpy()
                stats["step_size"][:, j] = self.step_size.expand(num_chains).numpy()
                stats["n_steps"][:, j] = steps.numpy()
                stats["tree_depth"][:, j] = np.ceil(np.log2(steps.numpy() + 1))
        end = time.perf_counter()
        return {
            "samples": samples,
            "stats": stats,
            "warmup": sampling_start - start,
            "sampling": end - sampling_start,
        }
