r"""Mini-batch EM: the annotator half of generalised EM (the paper's Algorithm 1).

:class:`OnlineEM` is what a training loop calls (:mod:`repo.train`);
:func:`fit_minibatch_em` runs it over fixed scores or a scorer with parameters.

Per optimizer step, with the annotator parameters :math:`\phi` (``eta``, ...) held:

1. **E-step** on each micro-batch: the posterior of the latent truths given the
   labels and the policy's induced logits :math:`s` (detached: no gradient flows
   through :math:`w`), by exact enumeration of the noise model
   (:func:`~repo.inference.enumeration.enumerate_posterior`). It gives, per truth
   unit, :math:`q_i = p(z_i = 1 \mid o, s, \phi)` (the soft target of the policy
   step) and, per label, :math:`w_{ij} = p(z_i = o_{ij} \mid o, s, \phi)`; and the
   noise model's sufficient statistics, which are sums over labels.
2. (the policy step, :mod:`repo.train.objective`.)
3. **M-step** once per optimizer step: the statistics of the step's micro-batches
   are summed and all-reduced over processes (``reduce``), the closed-form
   maximiser :math:`\hat\phi` computed, and every annotator seen blended in,
   :math:`\phi_k \leftarrow (1 - \alpha)\phi_k + \alpha\hat\phi_k`. Every process
   then holds the same :math:`\phi`.

Under a Beta prior (MAP-EM) the batch statistics are first scaled to the data set,
each annotator's by :math:`N_k / n_{k,B}` (labels in the data over labels in the
batch), so the prior weighs against the whole data as in full-batch MAP-EM rather
than against one batch; without a prior the scaling cancels and the update is the
paper's. Noise models with no closed form (Boltzmann) take one Adam step on the
step's marginal log-likelihood (gradients summed over micro-batches and processes)
plus the log prior over the data set.

The hierarchical model's per-annotator reliabilities are a posterior computed from
whole-data statistics (its parameters are the population's ``mu, sigma``), so for it
the EMA runs on the statistics instead: ``S_k <- (1 - alpha) S_k + alpha (N_k /
n_{k,B}) s_{k,B}`` for the annotators seen, and the M-step reads ``S`` (stochastic
EM in the manner of Cappe and Moulines, 2009). For the symmetric flip without a
prior this would be the same update as the paper's.

Two remedies for early, confidently wrong posteriors of reference-free losses
(SimPO, CPO start far from :math:`p = 1/2`):

* ``temperature`` :math:`T`: the E-step reads :math:`s / T`;
* ``calibrate``: the E-step reads :math:`a s`, with the scale :math:`a > 0` (starting
  at :math:`1/T`) learned by EM with the annotator parameters
  (:class:`~repo.scorers.CalibratedLogits`): per optimizer step the scale takes one
  Newton step on the step's expected complete-data log-likelihood in :math:`a` (over
  every unit of the step, revisits too: the scale is that of the policy's current
  logits, also with ``out_of_sample``), kept
  within a factor :data:`SCALE_STEP` of the current scale and not damped by the EMA
  rate (the scale is the scorer's, and must follow a policy whose logits change
  by orders of magnitude in a few steps: damped, the reliabilities reached 1/2 first,
  where the E-step no longer moves the policy); :meth:`OnlineEM.fit` fits :math:`a`
  jointly with the annotator parameters to convergence;
* ``warmup_steps``: for the first steps no E-step is taken: :math:`w` is fixed at
  the prior reliability the noise model implies before seeing the label
  (``implied_eta``; :math:`\eta_k` for the symmetric flip) and the annotators are
  not updated.

**Out-of-sample annotator statistics** (``out_of_sample``). A policy that has trained
on a label fits it, flipped or not, so statistics of labels it has seen push the
reliabilities up (``docs/math.md`` section 8). With ``out_of_sample`` the annotator
parameters learn only from each item's *first visit*, the E-step taken before any
policy step on that item: the online M-steps use only those units' statistics (none
after the first pass), and every item's first-visit logit :math:`c_i` is kept.
:meth:`OnlineEM.fit_out_of_sample` then fits the annotator parameters by full EM on
the kept logits with their Platt scale :math:`a` learned jointly
(:class:`~repo.scorers.CalibratedLogits`: the first-visit scores of a policy still
learning are under-confident, and a scale held at 1 reads that as reliable labels).
The scale found there calibrates only those scores, and is kept apart
(:attr:`OnlineEM.out_of_sample_scale`); the E-step that weights the policy step reads
the policy's logits as the other options say: at scale :math:`1/T`, or with
``calibrate`` at the scale learned online from every visit. (Were the first-visit
scale the E-step's, the later passes would read the policy's in-sample logits, by then
many times larger, through the scale of its first, under-confident ones: RE-SimPO at
8,192 pairs, flip rate 0.4, seed 21, fell to 0.648 held-out accuracy that way.)

**A refit at the end of each pass** (``pass_refit``). The online update moves the
annotator parameters a fraction ``alpha`` of the way per step, so an annotator far from
``eta_init`` (an adversary) is weighted wrongly for most of a pass. With ``pass_refit``
every item's logit is kept as its E-step read it in the current pass, and
:meth:`OnlineEM.end_pass` (called by the training loop after a pass's last step) fits
the annotator parameters to them by full EM, the logits read at the E-step's scale
(learned jointly with ``calibrate``) (:meth:`OnlineEM.fit_pass`; ``fit_out_of_sample``
refits on first visits, always with a Platt scale learned, and takes its place with
``out_of_sample``). No forward pass is added. A refit whose scores
carry no information about the truths is not taken: the labels alone would leave the
noise model's mirror solution as likely as the right one.

**Held-out labels** (:meth:`OnlineEM.fit_held_out`). First visits are out of sample
but scored by a policy still learning: where its first-pass scores are right on few more
pairs than chance, their sign says little of the truth and the one-annotator likelihood
trades ``eta`` against the scorer's accuracy (RE-IPO at 8,192 pairs, flip rate 0.4,
seed 23: first-visit signs right on 64% of pairs, ``eta`` fitted at 0.52 against a
realised 0.60). A training loop that keeps some items' labels out of every batch
scores them with the policy of each pass's end and hands the scores to
:meth:`end_pass`: the annotator parameters are refitted on them by EM with their Platt
scale learned (kept apart in :attr:`OnlineEM.held_out_scale`), and from then on learn
from nothing else (``docs/math.md`` section 12).

**A test before reweighting** (``noise_test``, a level :math:`\alpha`). Until the
labels show noise, the E-step hands the policy step :math:`w = 1` and the labels as
its targets: RE-X trains exactly as X. The annotator parameters and the scale learn
as usual meanwhile. The evidence is the likelihood-ratio test of "no label is wrong"
against the noise model (:mod:`~repo.inference.noise_test`), on the logits of the
items visited so far in the current pass over the data, with the model and a Platt
scale fitted as in ``fit_out_of_sample`` (on a copy: the online parameters are not
touched). In the first pass these are the first-visit logits, and the test looks when
the items visited reach 64, 128, 256, 512, every 512 after that, and all of them (the
scores gain power as the policy learns, so the looks come evenly where they can
reject); in each later pass it looks once, at its end, on the logits of that pass
(scores of labels the policy has trained on in earlier passes: they favour "no noise",
so these looks are conservative). Each of
the :math:`L` looks of the run is taken at level :math:`\alpha / L` (Bonferroni: on
clean data the E-step switches on with probability at most :math:`\alpha`), and the
test rejects at once when the labels of one unit disagree. Once it rejects, the
E-step is the posterior from then on.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from repo.inference.em import EM, EMResult, _has_parameters, ema_update, fit_em, set_value
from repo.inference.enumeration import EnumPosterior, enumerate_posterior
from repo.inference.noise_test import NoiseTest, disagreeing_units, likelihood_ratio_test
from repo.inference.profile import CHI2_1_95
from repo.noise.base import EPS, REPORTED, NoiseModel
from repo.noise.hierarchical import HierarchicalFlip
from repo.noise.layout import LabelData
from repo.scorers import MAX_SCALE, MIN_SCALE, CalibratedLogits, FixedLogits, Scorer

__all__ = [
    "FIRST_LOOK",
    "LOOK_SPACING",
    "REFIT_SCALES",
    "SCALE_STEP",
    "EStep",
    "OnlineEM",
    "all_threads",
    "fit_calibrated",
    "fit_from_starts",
    "fit_minibatch_em",
    "frozen",
    "look_points",
    "sign_agreement",
    "single_thread",
]

Reduce = Callable[[Tensor], Tensor]

SCALE_STEP = 4.0
"""Most the E-step's learned logit scale changes in one optimizer step (a factor)."""


_THREADS_OUTSIDE: list[int] = []
"""The intra-op threads torch had outside each :func:`single_thread` block now open."""


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small-tensor work on one CPU thread.

    The E-step handles a few hundred numbers; torch's intra-op thread pool costs more
    than it saves there (on a busy machine, milliseconds per operation while threads
    wait for a core), so the noise-model work runs single-threaded and the
    setting is restored afterwards. Work inside that is large enough to gain from the
    pool takes it back with :func:`all_threads`.
    """
    threads = torch.get_num_threads()
    _THREADS_OUTSIDE.append(threads)
    try:
        if threads != 1:
            torch.set_num_threads(1)
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
        _THREADS_OUTSIDE.pop()


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Inside :func:`single_thread`, the intra-op threads torch had outside it (else as
    it is): for the few operations over every label at once, such as the profile
    likelihood's grid of ``eta`` and scales (:meth:`~repo.noise.NoiseModel.eta_profile`,
    tens of millions of values), which one thread takes seconds over."""
    threads = torch.get_num_threads()
    outside = _THREADS_OUTSIDE[-1] if _THREADS_OUTSIDE else threads
    if outside == threads:
        yield
        return
    torch.set_num_threads(outside)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Hold a module's parameters fixed: no gradient reaches them inside the block."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


REFIT_SCALES = (1.0, 10.0, 100.0)
"""The Platt scales :meth:`OnlineEM.fit_out_of_sample` starts EM from (a policy's
first-visit logits can need a scale of 20 or more to be calibrated)."""


FIRST_LOOK = 64
"""Items visited at the noise test's first look (``noise_test``; the looks double)."""

LOOK_SPACING = 512
"""Items visited between the noise test's looks once the doubling reaches this many."""


def pass_ends(pass_size: int | Sequence[int], passes: int = 1) -> list[int]:
    """The visit counts (units visited, over passes) at which each of ``passes`` passes
    ends: ``pass_size`` is the units one pass visits, or a list of them pass by pass
    (its last repeated for passes beyond it; a run whose last pass also trains the
    held-out items, ``[em] train_held_out``, visits more units in it)."""
    sizes = [pass_size] if isinstance(pass_size, int) else list(pass_size)
    sizes = sizes + sizes[-1:] * (passes - len(sizes))
    return list(itertools.accumulate(sizes[:passes]))


def look_points(
    pass_size: int | Sequence[int], passes: int = 1, spacing: int = LOOK_SPACING
) -> list[int]:
    """The visit counts (units visited, over passes) at which the noise test looks: in
    the first pass :data:`FIRST_LOOK`, twice that, ... up to ``spacing``
    (:data:`LOOK_SPACING`), then every ``spacing`` below the first pass's size, and
    its end; then the end of every later pass (:func:`pass_ends`: ``p * pass_size``
    when the passes are of one size; ``spacing = pass_size`` gives the doubling looks
    alone, the schedule before 2026-12-05).

    Doubling spends few looks where the first-visit scores are weakest; the even
    spacing after it looks often where the policy has learned enough for the test to
    have power (a first pass of 8,192 pairs gets 19 looks rather than 8: RE-IPO's test
    at flip rate 0.4 rejects by three quarters of the pass in more runs, and switching
    the posterior on later than that gains little, ``docs/experiments/noise-sweep.md``).
    """
    ends = pass_ends(pass_size, passes)
    first = ends[0]
    points, n = [], FIRST_LOOK
    while n < min(first, spacing):
        points.append(n)
        n *= 2
    n = spacing
    while n < first:
        points.append(n)
        n += spacing
    return [*points, *ends]


def sign_agreement(logits: Tensor, data: LabelData) -> float:
    r"""The share of the labels that prefer the response their item's score favours,

    .. math::

        \frac{1}{n} \sum_{(i, j)} \mathbf{1}\left[\operatorname{sign}(s_i) = 2 o_{ij} - 1\right],

    over the ``n`` labels of ``data`` whose item has a score other than 0 or NaN
    (``logits``: ``(I,)`` per item); NaN when there are none."""
    s = logits[data.unit].unsqueeze(-1).expand_as(data.label)
    counted = data.mask & ~torch.isnan(s) & (s != 0)
    n = int(counted.sum())
    if n == 0:
        return float("nan")
    agree = (s > 0) == (data.label > 0.5)
    return float((agree & counted).sum()) / n


def _copy_state(noise: NoiseModel) -> dict[str, Tensor]:
    """A detached copy of ``noise``'s parameters (``load_state_dict`` restores them)."""
    return {k: v.detach().clone() for k, v in noise.state_dict().items()}


def _distinct_states(*states: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """``states`` without repeats (a state equal, tensor by tensor, to an earlier one)."""
    out: list[dict[str, Tensor]] = []
    for state in states:
        if not any(
            old.keys() == state.keys() and all(torch.equal(old[k], state[k]) for k in state)
            for old in out
        ):
            out.append(state)
    return out


@dataclass
class EStep:
    """The E-step of one micro-batch.

    :param q: ``(U,)`` posterior that A is truly better, per truth unit (the policy
        step's soft target).
    :param w: ``(U, S)`` posterior that each label is correct (0 on padding).
    :param log_likelihood: ``(U,)`` marginal log-likelihood of each unit's labels.
    :param exact: whether ``q`` is the exact posterior at the current parameters
        (no temperature, no warm-up), so that the policy step may be taken as the
        gradient of the marginal likelihood.
    :param held_back: the posterior is held back (:attr:`OnlineEM.posterior_on`: no
        evidence of noise yet, or no fit on held-out labels yet): ``w`` is the mask,
        ``q`` the labels' mean, and the policy step is the family's own loss on the
        labels as given (:func:`repo.train.objective.plain_loss`), whatever the
        policy-step variant.
    """

    q: Tensor
    w: Tensor
    log_likelihood: Tensor
    exact: bool
    held_back: bool = False


class OnlineEM:
    """E-steps per micro-batch and one damped annotator M-step per optimizer step.

    :param noise: the noise model (its parameters are updated in place).
    :param alpha: EMA rate in (0, 1].
    :param label_counts: ``(K,)`` labels per annotator in the whole data set (for the
        prior scaling and the Boltzmann log prior); ``None``: no scaling.
    :param temperature: E-step temperature ``T``.
    :param warmup_steps: optimizer steps with ``w`` fixed at the implied reliability.
    :param noise_lr: Adam step size of gradient M-steps.
    :param calibrate: learn the E-step's logit scale ``a`` (starting at ``1 / T``).
    :param policy_calibrate: with ``calibrate``, the posterior handed to the policy step
        reads ``a * s`` too; ``False``: it reads ``s / T`` (the annotator statistics,
        the noise test and the refits still read ``a * s``), so that a scale learned on
        a still-learning policy's scores does not hand the policy its own beliefs.
    :param out_of_sample: learn the annotator parameters from first visits only
        (module docstring); needs ``num_items``.
    :param num_items: items in the data (the scorer's keys, ``LabelData.unit``); when
        given, every item's first-visit logit is kept (:attr:`first_visit`), whether or
        not the annotator parameters learn from them alone.
    :param noise_test: the level of the test of label noise that switches the
        posterior on (module docstring); 0: the posterior from the first step (the
        paper's). Needs ``num_items`` and ``labels``.
    :param passes: passes over the items the run makes (the noise test's looks).
    :param pass_size: units visited in one pass (``num_items`` unless the schedule
        leaves some out of each pass), or a list of them pass by pass
        (:func:`pass_ends`).
    :param labels: the whole data's labels, keyed as the E-step's (for the noise test).
    :param pass_refit: at the end of every pass (:meth:`end_pass`), refit the annotator
        parameters by EM on the logits the E-steps of that pass read
        (:meth:`fit_pass`). Needs ``num_items``.
    :param held_out: the run holds items out of training and fits the annotator
        parameters on their scores at the end of every pass (:meth:`fit_held_out`);
        until the first such fit is taken the posterior is held back, as before evidence
        of noise (:attr:`posterior_on`).
    """

    def __init__(
        self,
        noise: NoiseModel,
        *,
        alpha: float = 0.1,
        label_counts: Tensor | None = None,
        temperature: float = 1.0,
        warmup_steps: int = 0,
        noise_lr: float = 0.05,
        calibrate: bool = False,
        policy_calibrate: bool = True,
        out_of_sample: bool = False,
        num_items: int | None = None,
        noise_test: float = 0.0,
        labels: LabelData | None = None,
        passes: int = 1,
        pass_size: int | Sequence[int] | None = None,
        pass_refit: bool = False,
        held_out: bool = False,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not noise.has_truth and (temperature != 1.0 or warmup_steps > 0 or calibrate):
            raise ValueError(
                f"the {noise.name} noise model has no latent truth: temperature, calibration "
                "and warm-up do not apply (leave [em] temperature = 1, calibrate = false and "
                "warmup_steps = 0)"
            )
        if out_of_sample and (num_items is None or num_items < 1):
            raise ValueError(f"out_of_sample needs the number of items, got {num_items}")
        if pass_refit and (num_items is None or num_items < 1):
            raise ValueError(f"pass_refit needs the number of items, got {num_items}")
        if not 0 <= noise_test < 1:
            raise ValueError(f"noise_test must lie in [0, 1), got {noise_test}")
        if noise_test > 0 and (not num_items or labels is None or not noise.has_truth):
            raise ValueError(
                "noise_test needs a noise model with a latent truth, the number of items "
                "and the labels"
            )
        self.noise = noise
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.calibrate = bool(calibrate)
        self.policy_calibrate = bool(policy_calibrate)
        self.scale = 1.0 / self.temperature
        self.warmup_steps = int(warmup_steps)
        self.label_counts = None if label_counts is None else label_counts.to(torch.float64)
        self.closed_form = self._has_closed_form()
        self.optimizer = (
            None
            if self.closed_form or not list(noise.parameters())
            else torch.optim.Adam(noise.parameters(), lr=noise_lr)
        )
        self.running_statistics = isinstance(noise, HierarchicalFlip)
        self._stats: dict[str, Tensor] | None = None
        self._running: dict[str, Tensor] | None = None
        self._calibration: Tensor | None = None  # (g, h) of the scale's Newton step
        self._units = 0
        self.out_of_sample = bool(out_of_sample)
        # the annotator parameters EM starts from (the model's prior guess, eta_init)
        self.initial_state = _copy_state(noise)
        # each item's logit at its first E-step (NaN: not visited yet)
        self.first_visit: Tensor | None = (
            torch.full((num_items,), float("nan"), dtype=torch.float64) if num_items else None
        )
        self.out_of_sample_scale: float | None = None  # a of the last fit_out_of_sample
        self.scale_of_refit: float | None = None  # a of the last refit
        self.held_out = bool(held_out)
        # a of the last fit_held_out; once set, the annotator parameters learn from no E-step
        self.held_out_scale: float | None = None
        self.held_out_logits: Tensor | None = None  # the logits of the last fit_held_out
        self.noise_test = float(noise_test)
        self.labels = labels
        # whether the E-step is the posterior (else w = 1 until the noise test rejects)
        self.noise_evident = self.noise_test == 0
        self.noise_test_result: NoiseTest | None = None  # the last look's outcome
        # the cross-fitted scores the E-step reads (fit_cross_fitted), by item; once set,
        # the annotator parameters and the scale are fixed
        self.cross_fit_logits: Tensor | None = None
        size = pass_size or int(num_items or 0)
        self._looks = look_points(size, max(passes, 1)) if self.noise_test > 0 else []
        self._level = self.noise_test / max(len(self._looks), 1)  # per look (Bonferroni)
        self.pass_refit = bool(pass_refit)
        # each item's logit in the current pass (NaN: not visited in it yet)
        self.pass_logits: Tensor | None = (
            torch.full((num_items,), float("nan"), dtype=torch.float64)
            if self.noise_test > 0 or self.pass_refit
            else None
        )
        self._new_pass = False  # a pass has ended: the next E-step starts the next one's logits
        self._visits = 0  # units visited on this process since the last M-step
        self._disagreed = False  # labels of one unit disagreed on this process this step
        self._visits_seen = 0  # units visited on all processes, over passes
        self._pass_sizes = [size] if isinstance(size, int) else [int(n) for n in size]
        self._pass_end = self._end_of_pass(0)  # visits at the end of the current pass

    def _has_closed_form(self) -> bool:
        probe = LabelData.from_labels(
            torch.zeros(1, dtype=torch.long),
            torch.ones(1),
            num_annotators=self.noise.num_annotators,
        )
        logits = torch.zeros(1, dtype=torch.float64)
        with torch.no_grad(), single_thread():
            posterior = enumerate_posterior(self.noise.e_step_model(), logits, probe)
            return self.noise.sufficient_statistics(probe, posterior.marginals, logits) is not None

    # -- E-step ---------------------------------------------------------------
    def in_warmup(self, step: int) -> bool:
        """Whether optimizer step ``step`` (from 0) is a warm-up step."""
        return step < self.warmup_steps

    def e_step(self, logits: Tensor, data: LabelData, step: int) -> EStep:
        """The posterior of one micro-batch at the current annotator parameters.

        ``logits`` ``(U,)`` are the units' induced logits (any device; detached here);
        once :meth:`fit_cross_fitted` has run, the E-step reads the units' cross-fitted
        scores instead. The sufficient statistics are accumulated for :meth:`m_step` (not
        during warm-up, nor after a held-out or cross-fitted fit; with ``out_of_sample``,
        only those of the units whose item is visited for the first time).
        """
        logits = logits.detach().to("cpu", torch.float64)
        noise = self.noise
        with torch.no_grad(), single_thread():
            new = self._record_first_visit(logits, data)
            if self._tracking_passes:  # the pass's record (warm-up steps too)
                self._record_pass(logits, data)
            if self.in_warmup(step):
                w = noise.implied_eta(logits, data).expand_as(data.label)
                q = _target_from_w(w, data)
                return EStep(q, w * data.mask, torch.zeros_like(logits), exact=False)
            crossed = self.cross_fit_logits is not None  # then it reads those scores
            tempered = self.calibrated(self.cross_fit_logits[data.unit] if crossed else logits)
            posterior = enumerate_posterior(noise.e_step_model(), tempered, data)
            w = noise.label_correct(tempered, data, posterior.marginals) * data.mask
            q = noise.truth_posterior(tempered, posterior.marginals)
            learn = None
            if self.held_out_scale is None and not crossed:  # those fits fix them
                learn = _learning_part(new, data, tempered, posterior, noise)
            if learn is not None and self.closed_form:
                part, part_logits, part_posterior = learn
                self._add(noise.sufficient_statistics(part, part_posterior.marginals, part_logits))
            if self.calibrate:  # the scale follows the policy's logits on every visit
                self._add_calibration(logits, q)
            if self.policy_at_temperature and not crossed and self.posterior_on:
                # the policy's posterior, s / T (none while it is held back)
                at_t = logits / self.temperature
                policy_posterior = enumerate_posterior(noise.e_step_model(), at_t, data)
                w = noise.label_correct(at_t, data, policy_posterior.marginals) * data.mask
                q = noise.truth_posterior(at_t, policy_posterior.marginals)
        if learn is not None and not self.closed_form:
            self._accumulate_gradient(learn[1], learn[0])
        self._units += data.num_units if new is None else int(new.sum())
        if not self.posterior_on:  # the labels as given
            w = data.mask.to(w.dtype)
            q = _target_from_w(w, data)
            return EStep(q, w, posterior.log_likelihood, exact=False, held_back=True)
        return EStep(q, w, posterior.log_likelihood, exact=self.exact)

    @property
    def policy_at_temperature(self) -> bool:
        """Whether the policy step's posterior reads ``s / T`` while the annotator
        statistics read the learned ``a * s`` (``calibrate`` without
        ``policy_calibrate``)."""
        return self.calibrate and not self.policy_calibrate

    @property
    def posterior_on(self) -> bool:
        """Whether the E-step gives the policy step the posterior (else the labels as
        given, :attr:`EStep.held_back`): once there is evidence of noise
        (:attr:`noise_evident`) and, with ``held_out``, once a fit on the held-out
        items' scores has been taken. Before that fit the annotator parameters are the
        online update's, read off a policy that is still learning the task: with one
        annotator they can sit near 1/2, where the posterior ignores the labels and the
        mixture step's targets pull every margin to 0 (an RE-IPO LoRA run of 8,192 pairs
        at flip rate 0.4 went from 0.84 held-out accuracy to 0.45 in the 128 steps after
        the noise test switched the posterior on at eta 0.50; docs/experiments/one-annotator.md)."""
        return self.noise_evident and (not self.held_out or self.held_out_scale is not None)

    def _record_first_visit(self, logits: Tensor, data: LabelData) -> Tensor | None:
        """Keep the logits of items not visited before; with ``out_of_sample`` return
        the ``(U,)`` mask of those units, else ``None`` (every unit learns)."""
        if self.first_visit is None:
            return None
        new = torch.isnan(self.first_visit[data.unit])
        self.first_visit[data.unit[new]] = logits[new]
        return new if self.out_of_sample else None

    @property
    def _tracking_passes(self) -> bool:
        """Whether the logits and visits of the pass are kept: for the pass refit, and
        for the noise test until it rejects."""
        return self.pass_refit or (self.noise_test > 0 and not self.noise_evident)

    def _record_pass(self, logits: Tensor, data: LabelData) -> None:
        """Keep the units' logits as this pass's, and count the visits."""
        if self._new_pass:
            self.pass_logits.fill_(float("nan"))
            self._new_pass = False
        if not self.noise_evident:
            self._disagreed |= bool(disagreeing_units(data).any())
        self.pass_logits[data.unit] = logits
        self._visits += data.num_units

    def _add_calibration(self, logits: Tensor, q: Tensor) -> None:
        p = torch.sigmoid(self.scale * logits)
        gh = torch.stack([((q - p) * logits).sum(), (p * (1 - p) * logits**2).sum()])
        self._calibration = gh if self._calibration is None else self._calibration + gh

    @property
    def exact(self) -> bool:
        """Whether the policy step's posterior is the exact posterior of the policy's own
        logits at the current annotator parameters, so that the step may be taken as the
        gradient of the marginal likelihood (:attr:`EStep.exact`): the E-step reads the
        logits as they are (scale 1, not learned), or the step's posterior reads
        ``s / T`` at ``T = 1`` (:attr:`policy_at_temperature`); never the cross-fitted
        scores of :meth:`fit_cross_fitted`, another scorer's."""
        as_they_are = self.scale == 1.0 and not self.calibrate
        at_one = self.policy_at_temperature and self.temperature == 1.0
        return (as_they_are or at_one) and self.cross_fit_logits is None

    def calibrated(self, logits: Tensor) -> Tensor:
        """The logits the E-step reads: ``a * logits`` (``a = 1 / T`` unless learned)."""
        return logits * self.scale

    def _add(self, stats: dict[str, Tensor]) -> None:
        if self._stats is None:
            self._stats = {k: v.clone() for k, v in stats.items()}
        else:
            for k, v in stats.items():
                self._stats[k] = self._stats[k] + v

    def _accumulate_gradient(self, logits: Tensor, data: LabelData) -> None:
        with single_thread():
            (-self.noise.marginal_log_likelihood(logits, data)).backward()

    # -- M-step ---------------------------------------------------------------
    def fit(
        self, logits: Tensor, data: LabelData, *, tol: float = 1e-6, max_iter: int = 500
    ) -> EMResult:
        """Full-data EM of the annotator parameters with the scorer held at ``logits``.

        ``logits`` are the induced logits by global unit index (``data.unit`` indexes
        them, as for :class:`~repo.scorers.FixedLogits`), tempered here by ``T``.
        EM alternates the exact E-step and the M-step to a relative log-likelihood
        change of ``tol`` (:func:`~repo.inference.em.fit_em`): the annotator
        parameters that maximise the marginal likelihood given the current scorer,
        the coordinate-ascent step between epochs. Statistics of a half-done
        optimizer step are discarded.
        """
        logits = logits.detach().to("cpu", torch.float64)
        if self.calibrate:
            scorer = CalibratedLogits(logits, _clamp_scale(self.scale))
        else:
            scorer = FixedLogits(self.calibrated(logits))
        with single_thread():
            result = fit_em(self.noise, scorer, data, tol=tol, max_iter=max_iter)
        if self.calibrate:
            self.scale = float(scorer.scale.detach())
        self._discard_step()
        self._running = None
        return result

    def first_visit_logits(self, reduce: Reduce | None = None) -> Tensor | None:
        """``(I,)`` every item's logit at its first E-step, combined over processes
        (``reduce`` sums; an item seen by several processes gets their mean), NaN where
        not visited; ``None`` when they are not kept (no ``num_items``)."""
        if self.first_visit is None:
            return None
        return _combine(self.first_visit, reduce)

    def fit_out_of_sample(
        self,
        data: LabelData,
        reduce: Reduce | None = None,
        *,
        tol: float = 1e-6,
        max_iter: int = 500,
    ) -> EMResult | None:
        """Full-data EM of the annotator parameters on the first-visit logits
        (:meth:`first_visit_logits`, over processes by ``reduce``): :meth:`refit` on
        them, the scale it learns kept in :attr:`out_of_sample_scale`.
        """
        first = self.first_visit_logits(reduce)
        if first is None:
            raise ValueError("fit_out_of_sample needs the first visits: OnlineEM(num_items=...)")
        result = self.refit(
            first, data, learn_scale=True, tol=tol, max_iter=max_iter, keep_scale=True
        )
        if result is not None:
            self.out_of_sample_scale = self.scale_of_refit
        return result

    def fit_held_out(
        self,
        logits: Tensor,
        data: LabelData,
        *,
        tol: float = 1e-6,
        max_iter: int = 500,
    ) -> EMResult | None:
        """Full-data EM of the annotator parameters on the logits of held-out items
        (``(I,)``, NaN for every item the policy trains on; the same on every process),
        scored by the current policy: :meth:`refit` with a Platt scale learned, kept in
        :attr:`held_out_scale`. Once a fit is taken, no E-step moves the annotator
        parameters: in-sample statistics lean to the labels the policy has fitted
        (``docs/math.md`` section 8), and only these scores are of labels it has not."""
        result = self.refit(
            logits, data, learn_scale=True, tol=tol, max_iter=max_iter, keep_scale=True
        )
        self.held_out_logits = logits.to(torch.float64).clone()
        if result is not None:
            self.held_out_scale = self.scale_of_refit
        return result

    def fit_cross_fitted(
        self,
        logits: Tensor,
        data: LabelData,
        *,
        tol: float = 1e-6,
        max_iter: int = 500,
    ) -> EMResult | None:
        r"""Fix the E-step on cross-fitted scores: ``logits`` ``(I,)``, each item's score
        by a scorer that never trained on it (the same on every process).

        The annotator parameters and a Platt scale :math:`a` are fitted to them by EM
        (:meth:`refit`, from several starts), and from then on every E-step reads
        :math:`a c_i` for the units of item :math:`i` instead of the policy's logits, at
        these fixed parameters: no E-step statistics, no M-step, no refit at a pass's end.
        With ``noise_test`` the posterior reaches the policy only when the likelihood-ratio
        test of "no label is wrong" on these scores rejects at that level (one look); where
        the scores carry no information about the truths (the fit is not taken) it never
        does, and RE-X trains as X on the labels as given. So too where the scores agree
        with at most half of the labels (:func:`sign_agreement`): a scorer trained on
        these annotators' labels learns what most of its labels say, so scores learned
        from them that agree with fewer than half of the labels they never saw learned
        nothing that carries over, and the fit would read the labels as worse than
        chance (one annotator at 64 rule pairs: ``eta`` 0.35 and the policy trained
        against its labels). The scores are kept (:attr:`cross_fit_logits`) in units of
        their root mean square, the scale's too. ``docs/math.md`` section 13."""
        logits = logits.detach().to("cpu", torch.float64)
        if torch.isnan(logits[data.unit]).any():
            raise ValueError("fit_cross_fitted needs a score for every item with a label")
        # in units of their root mean square, so that the scale's bounds do not bind
        rms = float(logits[data.unit].pow(2).mean().sqrt())
        logits = logits / rms if rms > 0 else logits
        result = None
        if sign_agreement(logits, data) > 0.5:  # else they learned nothing of the labels
            result = self.refit(
                logits, data, learn_scale=True, tol=tol, max_iter=max_iter, keep_scale=True
            )
        self.cross_fit_logits = logits.clone()
        self.calibrate = False  # the scale is the fit's, fixed with the annotator parameters
        if result is None:
            self.noise_evident = False
            return None
        self.scale = self.scale_of_refit
        if self.noise_test > 0:
            scorer = CalibratedLogits(logits, self.scale)
            with torch.no_grad(), single_thread():
                test = likelihood_ratio_test(self.noise, scorer, data, level=self.noise_test)
            self.noise_test_result = test
            self.noise_evident = test.rejected
        else:
            self.noise_evident = True
        return result

    def fit_pass(
        self,
        data: LabelData,
        reduce: Reduce | None = None,
        *,
        tol: float = 1e-6,
        max_iter: int = 500,
    ) -> EMResult | None:
        """Full-data EM of the annotator parameters on the logits the E-steps of the
        current pass read, each item's at its visit (over processes by ``reduce``):
        :meth:`refit` on them, read as the E-step reads them (their scale learned only
        with ``calibrate``). No forward pass is added; in a later pass these are
        scores of labels the policy has trained on (they lean to reliable labels, and a
        scale learned on them alone grows with the policy's fit of the labels: the
        demo's adversary, realised eta 0.19, came out at 0.37 with the scale learned
        and at 0.26 read at scale 1)."""
        if self.pass_logits is None:
            raise ValueError("fit_pass needs the pass's logits: OnlineEM(pass_refit=True, ...)")
        logits = _combine(self.pass_logits, reduce)
        return self.refit(logits, data, learn_scale=self.calibrate, tol=tol, max_iter=max_iter)

    def end_pass(
        self, step: int, reduce: Reduce | None = None, held_out: Tensor | None = None
    ) -> EMResult | None:
        """The annotator M-step to convergence a training loop takes after the last
        optimizer step of a pass (``step`` optimizer steps taken): :meth:`fit_held_out`
        when given the held-out items' logits (``held_out``); when there are none or
        that fit is not taken, :meth:`fit_out_of_sample` with ``out_of_sample``, else
        :meth:`fit_pass` with ``pass_refit``; nothing during the E-step warm-up. Every
        process must call it (it reduces). Nothing once the E-step reads cross-fitted
        scores (:meth:`fit_cross_fitted`)."""
        if self.in_warmup(step) or self.cross_fit_logits is not None:
            return None
        if held_out is not None:
            result = self.fit_held_out(held_out, self.labels_for_refit)
            if result is not None or self.held_out_scale is not None:
                return result
        if self.out_of_sample:
            return self.fit_out_of_sample(self.labels_for_refit, reduce)
        if self.pass_refit:
            return self.fit_pass(self.labels_for_refit, reduce)
        return None

    @property
    def labels_for_refit(self) -> LabelData:
        """The whole data's labels the refits read (``OnlineEM(labels=...)``)."""
        if self.labels is None:
            raise ValueError("a refit at the end of a pass needs OnlineEM(labels=...)")
        return self.labels

    def refit(
        self,
        logits: Tensor,
        data: LabelData,
        *,
        learn_scale: bool = True,
        tol: float = 1e-6,
        max_iter: int = 500,
        keep_scale: bool = False,
    ) -> EMResult | None:
        """Full-data EM of the annotator parameters on per-item ``logits`` (NaN: an item
        not scored), the units of scored items fitted with the noise model and, with
        ``learn_scale``, a Platt scale learned jointly
        (:class:`~repo.scorers.CalibratedLogits`); without, the logits read at the
        E-step's scale (:meth:`calibrated`).

        EM runs from several starts, the parameters the online update reached and the
        model's own (:attr:`initial_state`, its ``eta_init``), each (when the scale is
        learned) with the scale at every value of :data:`REFIT_SCALES`, and the fit with
        the highest likelihood is kept: along the ridge of the one-annotator likelihood
        (docs/math.md section 9) EM from a high reliability and a small scale stalls at
        "reliable labels, dull scorer" (LoRA runs of 8,192 pairs: eta 0.997 and 0.900
        against maxima at 0.69 and 0.59); where the model writes down the profile
        likelihood of its reliability (one annotator's symmetric flip), EM also runs from
        the profile's maximum (:func:`fit_calibrated`). The scale is kept in
        :attr:`scale_of_refit`
        (and used by the E-step too when ``calibrate``, unless ``keep_scale``: a scale
        that calibrates other scores than the E-step reads).
        ``None``, the parameters unchanged, when no item is scored or the scores carry
        no information about the truths (:meth:`_scores_inform`): the labels alone
        then pick among the noise model's mirror solutions (every reliability
        reflected through 1/2) at random.
        """
        units = (~torch.isnan(logits[data.unit])).nonzero().reshape(-1)
        if units.numel() == 0:
            return None
        part = data.subset(units)
        before = _copy_state(self.noise)
        logits = torch.nan_to_num(logits.to(torch.float64), nan=0.0)
        with single_thread():
            starts = _distinct_states(before, self.initial_state)
            if learn_scale:
                result, scorer = fit_calibrated(self.noise, logits, part, starts, tol, max_iter)
                scale = float(scorer.scale.detach())
            else:
                scale = self.scale
                fixed = FixedLogits(self.calibrated(logits))
                result = fit_from_starts(self.noise, fixed, part, starts, tol, max_iter)
            informative = self._scores_inform(part, result.objective, tol, max_iter)
        self._discard_step()
        self._running = None
        if not informative:
            self.noise.load_state_dict(before)
            return None
        self.scale_of_refit = scale
        if self.calibrate and not keep_scale:
            self.scale = self.scale_of_refit
        return result

    def _scores_inform(self, data: LabelData, objective: float, tol: float, max_iter: int) -> bool:
        r"""Whether the first-visit scores say anything about the truths: the likelihood
        ratio of the fit against the best fit with every score at 0 (:math:`a \to 0`),
        :math:`2(\hat\ell - \hat\ell_0)`, exceeds the 0.95 quantile of
        :math:`\chi^2_1` (one parameter, the scale). When it does not (a policy still
        at chance), the fit only wanders along a flat likelihood and is not taken."""
        null = copy.deepcopy(self.noise)
        zeros = torch.zeros(int(data.unit.max()) + 1, dtype=torch.float64)
        baseline = fit_em(null, FixedLogits(zeros), data, tol=tol, max_iter=max_iter)
        return 2 * (objective - baseline.objective) > CHI2_1_95

    def m_step(self, reduce: Reduce | None = None, *, alpha: float | None = None) -> None:
        """Update the annotator parameters from this step's statistics, then reset them;
        then, with ``noise_test`` and no evidence of noise yet, look for it when a look
        is due (:meth:`look_for_noise`).

        ``reduce`` sums a tensor over processes (identity when ``None``). ``alpha``
        overrides the EMA rate (1: the plain M-step).
        """
        if self.cross_fit_logits is not None:  # fixed at the fit on cross-fitted scores
            self._discard_step()
            return
        alpha = self.alpha if alpha is None else alpha
        reduce = reduce or (lambda t: t)
        try:
            if self.calibrate:
                self._calibration_step(reduce)
            if self.closed_form:
                self._closed_form_step(reduce, alpha)
            elif self.optimizer is not None:
                self._gradient_step(reduce)
        finally:
            self._discard_step()
        if not self._tracking_passes:
            return
        local = [float(self._visits), float(self._disagreed)]
        visits, disagreed = reduce(torch.tensor(local, dtype=torch.float64)).tolist()
        self._visits, self._disagreed = 0, False
        self._visits_seen += int(visits)
        if self.noise_test > 0 and not self.noise_evident:
            due = [n for n in self._looks if n <= self._visits_seen]
            if due or disagreed:
                self._looks = [n for n in self._looks if n > self._visits_seen]
                self.look_for_noise(reduce)
        if self._visits_seen >= self._pass_end:  # a pass ended: the next E-step starts anew
            self._pass_end = self._end_of_pass(self._visits_seen)
            self._new_pass = True

    def _end_of_pass(self, visits: int) -> int:
        """The visit count at which the pass under way after ``visits`` visits ends: the
        first of :func:`pass_ends` of ``pass_size`` above it (passes beyond those
        planned visit as many units as the last)."""
        last = self._pass_sizes[-1]
        ends = pass_ends(self._pass_sizes, len(self._pass_sizes))
        if visits < ends[-1] or last == 0:
            return next((end for end in ends if end > visits), ends[-1])
        return ends[-1] + ((visits - ends[-1]) // last + 1) * last

    def look_for_noise(self, reduce: Reduce | None = None) -> NoiseTest | None:
        """One look of the noise test on the items visited so far in this pass: the
        noise model and a Platt scale fitted by EM to their logits (on a copy, from the
        starts of :meth:`fit_out_of_sample`) against perfect labels
        (:func:`~repo.inference.noise_test.likelihood_ratio_test`), at the level
        ``noise_test`` over the run's looks. Sets :attr:`noise_evident` when it
        rejects; keeps the outcome in :attr:`noise_test_result`. ``None`` when nothing
        has been visited."""
        if self.pass_logits is None or self.labels is None:
            raise ValueError("the noise test needs OnlineEM(noise_test=..., labels=...)")
        current = _combine(self.pass_logits, reduce)
        units = (~torch.isnan(current[self.labels.unit])).nonzero().reshape(-1)
        if units.numel() == 0:
            return None
        part = self.labels.subset(units)
        noise = copy.deepcopy(self.noise)
        logits = torch.nan_to_num(current, nan=0.0)
        # in units of their root mean square, so that the scale's bounds do not bind
        # (a loss of summed log-probs scores +-100 from the first step: held at
        # a >= MIN_SCALE, perfect labels could not call such scores uninformative)
        rms = float(logits[self.labels.unit[units]].pow(2).mean().sqrt())
        logits = logits / rms if rms > 0 else logits
        with single_thread():
            starts = _distinct_states(_copy_state(noise), self.initial_state)
            _, scorer = fit_calibrated(noise, logits, part, starts)
            result = likelihood_ratio_test(noise, scorer, part, level=self._level)
        self.noise_test_result = result
        self.noise_evident = result.rejected
        return result

    def _discard_step(self) -> None:
        """Forget the statistics accumulated since the last M-step."""
        self._stats = None
        self._calibration = None
        self._units = 0

    def _calibration_step(self, reduce: Reduce) -> None:
        r"""One Newton step for the scale on this step's units.

        With :math:`g = \sum_i (q_i - \sigma(a c_i)) c_i` and
        :math:`h = \sum_i \sigma(a c_i)(1 - \sigma(a c_i)) c_i^2` summed over the
        step's units on every process (``reduce``), :math:`a \leftarrow a + g/h` (the
        Newton step of the concave problem of :class:`~repo.scorers.CalibratedLogits`),
        kept within a factor :data:`SCALE_STEP` of :math:`a` and within the scorer's
        bounds. Not damped by the EMA rate (module docstring).
        """
        gh = self._calibration if self._calibration is not None else torch.zeros(2)
        g, h = reduce(gh.to(torch.float64)).tolist()
        if h <= 0:
            return
        a = self.scale
        low, high = _clamp_scale(a / SCALE_STEP), _clamp_scale(a * SCALE_STEP)
        self.scale = min(max(a + g / h, low), high)

    def _closed_form_step(self, reduce: Reduce, alpha: float) -> None:
        if self._stats is None:  # warm-up, or no E-step this step: nothing to learn from
            reduce(torch.zeros(1, dtype=torch.float64))  # keep the processes in step
            return
        names = sorted(self._stats)
        flat = torch.cat([self._stats[k].reshape(-1) for k in names])
        flat = reduce(flat)
        stats, offset = {}, 0
        for k in names:
            n = self._stats[k].numel()
            stats[k] = flat[offset : offset + n].reshape(self._stats[k].shape)
            offset += n
        seen = stats["n"] > 0
        if self.running_statistics:
            self._running_step(stats, seen, alpha)
            return
        if self.noise.prior is not None and self.label_counts is not None:
            stats = self._scale_to_data(stats)
        with torch.no_grad(), single_thread():
            ema_update(self.noise, self.noise.m_step(stats), seen, alpha)

    def _running_step(self, stats: dict[str, Tensor], seen: Tensor, alpha: float) -> None:
        """EMA of the statistics scaled to the data, then the M-step on them (no EMA of
        the parameters): ``S_k <- (1 - alpha) S_k + alpha (N_k / n_k) s_k`` for the
        annotators seen. Zero statistics are "no labels yet" (the population prior)."""
        scaled = self._scale_to_data(stats) if self.label_counts is not None else stats
        if self._running is None:
            self._running = {k: torch.zeros_like(v) for k, v in scaled.items()}
        for name, value in scaled.items():
            old = self._running[name]
            mask = seen.reshape(seen.shape + (1,) * (value.dim() - 1)) if value.dim() else seen
            self._running[name] = torch.where(mask, old + alpha * (value - old), old)
        with torch.no_grad(), single_thread():
            for name, value in self.noise.m_step(dict(self._running)).items():
                set_value(self.noise, name, value)

    def _scale_to_data(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-annotator sums (leading dim ``K``) scaled by ``N_k / n_k`` (module docstring)."""
        n = stats["n"]
        factor = torch.where(n > 0, self.label_counts / n.clamp_min(1e-300), torch.zeros_like(n))
        k = self.noise.num_annotators
        out = {}
        for name, value in stats.items():
            if value.dim() >= 1 and value.shape[0] == k:
                value = value * factor.reshape((k,) + (1,) * (value.dim() - 1))
            out[name] = value
        return out

    def _gradient_step(self, reduce: Reduce) -> None:
        params = list(self.noise.parameters())
        units = float(reduce(torch.tensor([float(self._units)], dtype=torch.float64))[0])
        total = float(self.label_counts.sum()) if self.label_counts is not None else units
        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = reduce(grad.clone()) / max(units, 1.0)
        with single_thread():
            log_prior = self.noise.log_prior()
            if log_prior.requires_grad:  # MAP: the prior once over the whole data
                (-log_prior / max(total, 1.0)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    # -- state ----------------------------------------------------------------
    def state_dict(self, reduce: Reduce | None = None) -> dict[str, Tensor]:
        """The noise model's tensors, the E-step's logit scale (and the running
        statistics, or the gradient M-step's Adam moments).

        The per-item logits each process keeps (first visits, the noise test's pass)
        are combined over processes by ``reduce`` (:func:`_combine`), so that a run
        resumed from the main process's copy knows every item any process visited;
        with several processes every one of them must call this (a collective)."""
        state = {f"noise.{k}": v.detach().clone() for k, v in self.noise.state_dict().items()}
        state["calibration.scale"] = torch.tensor(self.scale, dtype=torch.float64)
        if self.first_visit is not None:
            state["first_visit.logits"] = _combine(self.first_visit, reduce)
        if self.out_of_sample_scale is not None:
            state["first_visit.scale"] = torch.tensor(self.out_of_sample_scale, dtype=torch.float64)
        if self.held_out_scale is not None:
            state["held_out.scale"] = torch.tensor(self.held_out_scale, dtype=torch.float64)
        if self.held_out_logits is not None:
            state["held_out.logits"] = self.held_out_logits.clone()
        if self.noise_test > 0:
            state["noise_test.evident"] = torch.tensor(self.noise_evident)
        if self.pass_logits is not None:
            state["noise_test.visits_seen"] = torch.tensor(self._visits_seen)
            state["noise_test.pass_logits"] = _combine(self.pass_logits, reduce)
        if self.noise_test_result is not None:
            state["noise_test.result"] = self.noise_test_result.to_tensor()
        if self.cross_fit_logits is not None:
            state["cross_fit.logits"] = self.cross_fit_logits.clone()
            state["cross_fit.evident"] = torch.tensor(self.noise_evident)
        for k, v in (self._running or {}).items():
            state[f"running.{k}"] = v.clone()
        if self.optimizer is not None:
            for i, s in self.optimizer.state_dict()["state"].items():
                for name, value in s.items():
                    state[f"adam.{i}.{name}"] = torch.as_tensor(value).clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (strict: the same noise model and size)."""
        noise_state = {k[len("noise.") :]: v for k, v in state.items() if k.startswith("noise.")}
        self.noise.load_state_dict(noise_state, strict=True)
        if "calibration.scale" in state:
            self.scale = float(state["calibration.scale"])
        if self.first_visit is not None and "first_visit.logits" in state:
            self.first_visit = state["first_visit.logits"].to(torch.float64).clone()
        if "first_visit.scale" in state:
            self.out_of_sample_scale = float(state["first_visit.scale"])
        if "held_out.scale" in state:
            self.held_out_scale = float(state["held_out.scale"])
        if "held_out.logits" in state:
            self.held_out_logits = state["held_out.logits"].to(torch.float64).clone()
        if "noise_test.evident" in state and self.noise_test > 0:
            self.noise_evident = bool(state["noise_test.evident"])
        if "noise_test.visits_seen" in state and self.pass_logits is not None:
            self._visits_seen = int(state["noise_test.visits_seen"])
            self._looks = [n for n in self._looks if n > self._visits_seen]
            self._pass_end = self._end_of_pass(self._visits_seen)
            seen = self._visits_seen  # resumed at a pass's end: the next E-step starts anew
            self._new_pass = seen > 0 and self._end_of_pass(seen - 1) == seen
            self.pass_logits = state["noise_test.pass_logits"].to(torch.float64).clone()
        if "noise_test.result" in state:
            self.noise_test_result = NoiseTest.from_tensor(state["noise_test.result"])
        if "cross_fit.logits" in state:
            self.cross_fit_logits = state["cross_fit.logits"].to(torch.float64).clone()
            self.noise_evident = bool(state["cross_fit.evident"])
            self.calibrate = False
        running = {k[len("running.") :]: v for k, v in state.items() if k.startswith("running.")}
        self._running = running or None
        if self.optimizer is not None:
            adam = self.optimizer.state_dict()
            per_param: dict[int, dict[str, Tensor]] = {}
            for key, value in state.items():
                if key.startswith("adam."):
                    _, index, name = key.split(".", 2)
                    per_param.setdefault(int(index), {})[name] = value
            adam["state"] = per_param
            self.optimizer.load_state_dict(adam)


def _combine(logits: Tensor, reduce: Reduce | None) -> Tensor:
    """Per-item logits kept on each process (NaN: not visited there) combined over
    processes: the mean of the processes that visited an item, NaN where none did."""
    reduce = reduce or (lambda t: t)
    seen = ~torch.isnan(logits)
    total = reduce(torch.where(seen, logits, 0.0))
    count = reduce(seen.to(torch.float64))
    return torch.where(count > 0, total / count.clamp_min(1.0), float("nan"))


def _best_fit(
    noise: NoiseModel,
    fits: Iterable[tuple[dict[str, Tensor], Scorer]],
    data: LabelData,
    tol: float,
    max_iter: int,
) -> tuple[EMResult, Scorer]:
    """EM of ``noise`` from each ``(start, scorer)`` of ``fits``: ``noise`` loaded with
    the start, fitted with the scorer; ``noise`` is left at the fit of the highest
    objective, returned with its scorer."""
    best: tuple[EMResult, Scorer, dict[str, Tensor]] | None = None
    for start, scorer in fits:
        noise.load_state_dict(start)
        result = fit_em(noise, scorer, data, tol=tol, max_iter=max_iter)
        if best is None or result.objective > best[0].objective:
            best = (result, scorer, _copy_state(noise))
    result, scorer, fitted = best
    noise.load_state_dict(fitted)
    return result, scorer


def fit_from_starts(
    noise: NoiseModel,
    scorer: Scorer,
    data: LabelData,
    starts: list[dict[str, Tensor]],
    tol: float = 1e-6,
    max_iter: int = 500,
) -> EMResult:
    """EM of ``noise`` with ``scorer`` held, from every parameter state of ``starts``;
    ``noise`` is left at the fit of the highest objective, which is returned."""
    return _best_fit(noise, ((start, scorer) for start in starts), data, tol, max_iter)[0]


def fit_calibrated(
    noise: NoiseModel,
    logits: Tensor,
    data: LabelData,
    starts: list[dict[str, Tensor]],
    tol: float = 1e-6,
    max_iter: int = 500,
) -> tuple[EMResult, CalibratedLogits]:
    r"""EM of ``noise`` and a Platt scale on fixed ``logits`` (:class:`CalibratedLogits`)
    from every parameter state of ``starts`` at every scale of :data:`REFIT_SCALES`,
    and, where the model writes down the profile likelihood of its reliability
    (:meth:`~repo.noise.base.NoiseModel.eta_profile`), from the profile's maximum
    :math:`(\hat\eta, \hat a)` too; ``noise`` is left at the fit of the highest
    objective, returned with its scorer.

    The profile's start is kept only when its fit beats the others by more than EM's
    tolerance (``tol`` times the objective), so a fit the other starts converged to is
    kept to the digit. Along a flat ridge of the one-annotator likelihood EM stops by
    tolerance where the ridge is flattest, not at its maximum (LoRA RE-DPO, 8,192 pairs,
    four passes, seed 5: ``eta`` 0.877 from every other start, log-likelihood
    -5611.323; the maximum at 0.657, -5610.974, where EM stays)."""
    fits = (
        (start, CalibratedLogits(logits, scale))
        for start, scale in itertools.product(starts, REFIT_SCALES)
    )
    best, scorer = _best_fit(noise, fits, data, tol, max_iter)
    with all_threads():
        profile = noise.eta_profile(logits, data)
    if profile is None:
        return best, scorer
    fitted = _copy_state(noise)
    eta = min(max(profile.estimate, EPS), 1 - EPS)
    set_value(noise, REPORTED, torch.full_like(getattr(noise, REPORTED).detach(), eta))
    at_maximum = CalibratedLogits(logits, _clamp_scale(profile.scale_estimate))
    result = fit_em(noise, at_maximum, data, tol=tol, max_iter=max_iter)
    if result.objective - best.objective > tol * abs(best.objective):
        return result, at_maximum
    noise.load_state_dict(fitted)
    return best, scorer


def _clamp_scale(scale: float) -> float:
    """A scale inside :class:`~repo.scorers.CalibratedLogits`' default bounds."""
    return min(max(scale, MIN_SCALE), MAX_SCALE)


def _learning_part(
    new: Tensor | None,
    data: LabelData,
    logits: Tensor,
    posterior: EnumPosterior,
    noise: NoiseModel,
) -> tuple[LabelData, Tensor, EnumPosterior] | None:
    """The part of a micro-batch the annotator parameters learn from:
    ``(data, logits, posterior)`` of all units (``new is None``), of the new units
    only (their posterior recomputed), or ``None`` when no unit is new."""
    if new is None or bool(new.all()):
        return data, logits, posterior
    if not bool(new.any()):
        return None
    index = new.nonzero().reshape(-1)
    part, part_logits = data.subset(index), logits[index]
    return part, part_logits, enumerate_posterior(noise.e_step_model(), part_logits, part)


def _target_from_w(w: Tensor, data: LabelData) -> Tensor:
    """The soft target ``q_i = p(A better)`` implied by per-label ``w`` with truth fixed
    per unit: the product of the label channels, normalised (prior 1/2)."""
    o = data.label
    log_a = torch.where(data.mask, torch.log(torch.where(o > 0.5, w, 1 - w).clamp_min(1e-12)), 0)
    log_b = torch.where(data.mask, torch.log(torch.where(o > 0.5, 1 - w, w).clamp_min(1e-12)), 0)
    return torch.sigmoid(log_a.sum(-1) - log_b.sum(-1))


def fit_minibatch_em(
    noise: NoiseModel,
    scorer: Scorer,
    data: LabelData,
    *,
    batch_size: int,
    alpha: float = 0.1,
    epochs: int = 1,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
) -> EMResult:
    """The paper's Algorithm 1 on fixed data: per mini-batch an E-step and a damped
    M-step (:class:`OnlineEM`), the scorer's parameters updated alongside.

    A scorer with a closed-form M-step is blended in with the same ``alpha``; one
    without takes an Adam step (learning rate ``lr``) on the batch's marginal
    log-likelihood scaled to the whole data. ``trace`` holds the full-data
    objective after each epoch.
    """
    online = OnlineEM(noise, alpha=alpha, label_counts=data.label_counts(), noise_lr=lr)
    em = EM(noise, scorer, data)
    learned = _has_parameters(scorer)
    adam = None
    if learned and not em.scorer_closed:
        adam = torch.optim.Adam(scorer.parameters(), lr=lr)
    trace: list[float] = []
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(data.num_units, generator=generator)
        for start in range(0, data.num_units, batch_size):
            batch = data.subset(order[start : start + batch_size])
            with torch.no_grad():
                logits = scorer(batch).detach()
            estep = online.e_step(logits, batch, steps)
            online.m_step()
            if learned and em.scorer_closed:
                stats = scorer.sufficient_statistics(batch, estep.q)
                ema_update(scorer, scorer.m_step(stats), torch.ones((), dtype=torch.bool), alpha)
            elif adam is not None:
                adam.zero_grad()
                scale = data.num_units / batch.num_units
                ll = noise.marginal_log_likelihood(scorer(batch), batch) * scale
                (-(ll + scorer.log_prior()) / data.num_labels).backward()
                adam.step()
            steps += 1
        trace.append(em.e_step()[2])
    logits, posterior, value = em.e_step()
    return EMResult(False, steps, value, trace, logits, posterior)
