"""Tests for repo.likelihoods: induced preference likelihoods of DPO/IPO/SimPO/CPO and baselines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repo.likelihoods import (
    CDPOLikelihood,
    CPOLikelihood,
    DPOLikelihood,
    HingeLikelihood,
    HolderDPOLikelihood,
    InducedLikelihood,
    IPOLikelihood,
    PairLogps,
    PreferenceLikelihood,
    RDPOLikelihood,
    SimPOLikelihood,
    available_likelihoods,
    get_likelihood,
)

DTYPE = torch.float64


def make_stats(
    n: int = 64, seed: int = 0, reference: bool = True, requires_grad: bool = False
) -> PairLogps:
    """Random but realistic per-pair statistics (summed log-probs of responses of 5-300 tokens)."""
    g = torch.Generator().manual_seed(seed)
    length_a = torch.randint(5, 300, (n,), generator=g).to(DTYPE)
    length_b = torch.randint(5, 300, (n,), generator=g).to(DTYPE)
    per_tok_a = -0.2 - 2.0 * torch.rand(n, generator=g, dtype=DTYPE)
    per_tok_b = -0.2 - 2.0 * torch.rand(n, generator=g, dtype=DTYPE)
    policy_a = (per_tok_a * length_a).requires_grad_(requires_grad)
    policy_b = (per_tok_b * length_b).requires_grad_(requires_grad)
    ref_a = ref_b = None
    if reference:
        # reference within a few nats of the policy, as during DPO training
        ref_a = policy_a.detach() + 3.0 * torch.randn(n, generator=g, dtype=DTYPE)
        ref_b = policy_b.detach() + 3.0 * torch.randn(n, generator=g, dtype=DTYPE)
    return PairLogps(policy_a, policy_b, length_a, length_b, ref_a, ref_b)


ALL_FAMILIES = [
    DPOLikelihood(beta=0.1),
    DPOLikelihood(beta=2.0),
    IPOLikelihood(beta=0.1),
    IPOLikelihood(beta=0.5, length_normalized=True),
    SimPOLikelihood(beta=2.0, gamma=0.0),
    SimPOLikelihood(beta=2.5, gamma=1.4),
    CPOLikelihood(beta=0.1),
    CPOLikelihood(beta=0.5, nll_weight=0.3, nll_length_normalized=True),
    HingeLikelihood(beta=0.1),
    CDPOLikelihood(beta=0.1, epsilon=0.2),
    RDPOLikelihood(beta=0.1, epsilon=0.2),
    HolderDPOLikelihood(beta=0.1, gamma=0.5),
    HolderDPOLikelihood(beta=2.0, gamma=1.5),
]


def ids(lik: PreferenceLikelihood) -> str:
    return repr(lik)


def stats_for(lik: PreferenceLikelihood, **kw) -> PairLogps:
    return make_stats(reference=lik.needs_reference, **kw)


def generic_logits(lik: PreferenceLikelihood, stats: PairLogps) -> torch.Tensor:
    return PreferenceLikelihood.logits(lik, stats)


def normaliser(lik: PreferenceLikelihood, stats: PairLogps) -> torch.Tensor:
    """exp(-L(A > B)) + exp(-L(B > A))."""
    return torch.exp(-lik.loss(stats)) + torch.exp(-lik.loss(stats.swap()))


# --------------------------------------------------------------------------- stats


def test_pair_logps_means_and_swap() -> None:
    st = make_stats(8)
    torch.testing.assert_close(st.policy_mean_a, st.policy_a / st.length_a)
    torch.testing.assert_close(st.policy_mean_b, st.policy_b / st.length_b)
    sw = st.swap()
    assert sw.policy_a is st.policy_b and sw.length_a is st.length_b
    assert sw.reference_a is st.reference_b and sw.reference_b is st.reference_a
    assert sw.swap() == st
    torch.testing.assert_close(sw.log_ratio_a, st.log_ratio_b)


def test_pair_logps_validation() -> None:
    st = make_stats(4)
    with pytest.raises(ValueError, match="both"):
        PairLogps(st.policy_a, st.policy_b, st.length_a, st.length_b, st.reference_a, None)
    with pytest.raises(ValueError, match="shape"):
        PairLogps(st.policy_a, st.policy_b[:3], st.length_a, st.length_b)
    with pytest.raises(ValueError, match="reference"):
        _ = make_stats(4, reference=False).log_ratio_a


# --------------------------------------------------------------------------- induced logits


def test_dpo_is_likelihood_style() -> None:
    lik = DPOLikelihood(beta=0.7)
    st = make_stats(256, seed=1)
    assert lik.likelihood_style
    torch.testing.assert_close(normaliser(lik, st), torch.ones(256, dtype=DTYPE), atol=1e-6, rtol=0)
    torch.testing.assert_close(lik.log_normaliser(st), torch.zeros(256, dtype=DTYPE))
    h = st.log_ratio_a - st.log_ratio_b
    torch.testing.assert_close(lik.loss(st), -F.logsigmoid(0.7 * h))


def test_ipo_induced_logit_is_2h_over_beta() -> None:
    beta = 0.3
    lik = IPOLikelihood(beta=beta)
    st = make_stats(seed=2)
    h = st.log_ratio_a - st.log_ratio_b
    torch.testing.assert_close(lik.logits(st), 2 * h / beta)
    torch.testing.assert_close(generic_logits(lik, st), 2 * h / beta)
    torch.testing.assert_close(lik.loss(st), (h - 1 / (2 * beta)) ** 2)
    assert not lik.likelihood_style
    assert lik.log_normaliser(st).abs().max() > 1e-3


def test_cpo_induced_logit_is_beta_plus_one_times_delta() -> None:
    beta = 0.1
    lik = CPOLikelihood(beta=beta)
    st = make_stats(seed=3, reference=False)
    delta = st.policy_a - st.policy_b
    torch.testing.assert_close(lik.logits(st), (beta + 1) * delta)
    torch.testing.assert_close(generic_logits(lik, st), (beta + 1) * delta)
    assert not lik.likelihood_style
    assert CPOLikelihood(beta=beta, nll_weight=0.0).likelihood_style


def test_simpo_likelihood_style_only_at_gamma_zero() -> None:
    st = make_stats(seed=4, reference=False)
    lik0 = SimPOLikelihood(beta=2.0, gamma=0.0)
    assert lik0.likelihood_style
    torch.testing.assert_close(normaliser(lik0, st), torch.ones(64, dtype=DTYPE), atol=1e-6, rtol=0)
    d = 2.0 * (st.policy_mean_a - st.policy_mean_b)
    torch.testing.assert_close(lik0.logits(st), d)

    lik1 = SimPOLikelihood(beta=2.0, gamma=1.0)
    assert not lik1.likelihood_style
    assert (normaliser(lik1, st) - 1).abs().max() > 1e-2
    expected = F.logsigmoid(d - 1.0) - F.logsigmoid(-d - 1.0)
    torch.testing.assert_close(lik1.logits(st), expected)


@pytest.mark.parametrize("lik", ALL_FAMILIES, ids=ids)
def test_closed_form_logits_match_generic(lik: PreferenceLikelihood) -> None:
    st = stats_for(lik, seed=5)
    torch.testing.assert_close(lik.logits(st), generic_logits(lik, st), atol=1e-5, rtol=1e-5)
    # antisymmetry of the induced logit: s(B > A) = -s(A > B)
    torch.testing.assert_close(lik.logits(st.swap()), -lik.logits(st), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lik", ALL_FAMILIES, ids=ids)
def test_likelihood_style_flag_is_truthful(lik: PreferenceLikelihood) -> None:
    st = stats_for(lik, seed=6)
    is_normalised = bool(torch.allclose(normaliser(lik, st), torch.ones(64, dtype=DTYPE)))
    assert lik.likelihood_style == is_normalised


def test_baseline_closed_forms() -> None:
    st = make_stats(seed=7)
    h = st.log_ratio_a - st.log_ratio_b
    beta, eps = 0.1, 0.2
    torch.testing.assert_close(CDPOLikelihood(beta, eps).logits(st), (1 - 2 * eps) * beta * h)
    torch.testing.assert_close(RDPOLikelihood(beta, eps).logits(st), beta * h / (1 - 2 * eps))
    bh = beta * h
    hinge = torch.where(bh.abs() <= 1, 2 * bh, bh + torch.sign(bh))
    torch.testing.assert_close(HingeLikelihood(beta).logits(st), hinge)
    torch.testing.assert_close(HingeLikelihood(beta).loss(st), torch.clamp(1 - bh, min=0))


@pytest.mark.parametrize("cls", [CDPOLikelihood, RDPOLikelihood])
def test_cdpo_rdpo_reduce_to_dpo_at_zero_epsilon(cls) -> None:
    st = make_stats(seed=8)
    dpo = DPOLikelihood(beta=0.2)
    lik = cls(beta=0.2, epsilon=0.0)
    torch.testing.assert_close(lik.loss(st), dpo.loss(st))
    torch.testing.assert_close(lik.logits(st), dpo.logits(st))
    w = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    for variant in ("nll", "mixture"):
        torch.testing.assert_close(lik.policy_loss(st, w, variant), dpo.policy_loss(st, w, variant))


# --------------------------------------------------------------------------- policy losses


@pytest.mark.parametrize("lik", ALL_FAMILIES, ids=ids)
def test_policy_loss_at_w_one(lik: PreferenceLikelihood) -> None:
    st = stats_for(lik, seed=9)
    ones = torch.ones(64, dtype=DTYPE)
    torch.testing.assert_close(lik.policy_loss(st, ones, "nll"), -F.logsigmoid(lik.logits(st)))
    torch.testing.assert_close(lik.policy_loss(st, 1.0, "mixture"), lik.loss(st))
    # w = 0 is the reversed statement
    torch.testing.assert_close(lik.policy_loss(st, 0.0, "mixture"), lik.loss(st.swap()))
    torch.testing.assert_close(lik.policy_loss(st, 0.0, "nll"), -F.logsigmoid(-lik.logits(st)))


def test_dpo_nll_at_w_one_is_dpo_loss() -> None:
    lik = DPOLikelihood(beta=0.5)
    st = make_stats(seed=10)
    torch.testing.assert_close(lik.policy_loss(st, 1.0, "nll"), lik.loss(st))
    torch.testing.assert_close(lik.policy_loss(st, 1.0), lik.loss(st))


@pytest.mark.parametrize(
    "lik",
    [DPOLikelihood(0.3), SimPOLikelihood(2.0, 0.0), CPOLikelihood(0.2, nll_weight=0.0)],
    ids=ids,
)
def test_nll_and_mixture_coincide_for_likelihood_style(lik: PreferenceLikelihood) -> None:
    st = stats_for(lik, seed=11, requires_grad=True)
    w = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    nll = lik.policy_loss(st, w, "nll")
    mix = lik.policy_loss(st, w, "mixture")
    torch.testing.assert_close(nll, mix)
    g_nll = torch.autograd.grad(nll.sum(), (st.policy_a, st.policy_b))
    g_mix = torch.autograd.grad(mix.sum(), (st.policy_a, st.policy_b))
    for a, b in zip(g_nll, g_mix, strict=True):
        torch.testing.assert_close(a, b)


def test_nll_and_mixture_differ_for_ipo() -> None:
    lik = IPOLikelihood(beta=0.1)
    st = make_stats(seed=12, requires_grad=True)
    w = torch.full((64,), 0.8, dtype=DTYPE)
    g_nll = torch.autograd.grad(lik.policy_loss(st, w, "nll").sum(), st.policy_a)[0]
    g_mix = torch.autograd.grad(lik.policy_loss(st, w, "mixture").sum(), st.policy_a)[0]
    assert not torch.allclose(g_nll, g_mix)
    # the mixture is a regression of h onto the shrunk target (2w - 1) / (2 beta)
    h = (st.log_ratio_a - st.log_ratio_b).detach()
    tau = 1 / (2 * 0.1)
    mix = lik.policy_loss(st, w, "mixture").detach()
    torch.testing.assert_close(mix, (h - (2 * w - 1) * tau) ** 2 + 4 * w * (1 - w) * tau**2)


def test_policy_loss_does_not_differentiate_w() -> None:
    lik = IPOLikelihood(beta=0.1)
    st = make_stats(seed=13, requires_grad=True)
    w = torch.full((64,), 0.3, dtype=DTYPE, requires_grad=True)
    for variant in ("nll", "mixture"):
        out = lik.policy_loss(st, w, variant).sum()
        (grad_w,) = torch.autograd.grad(out, w, allow_unused=True)
        assert grad_w is None


def test_nll_matches_bce_with_logits() -> None:
    lik = SimPOLikelihood(beta=2.5, gamma=1.0)
    st = make_stats(seed=14, reference=False)
    w = torch.rand(64, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    expected = F.binary_cross_entropy_with_logits(lik.logits(st), w, reduction="none")
    torch.testing.assert_close(lik.policy_loss(st, w, "nll"), expected)


def test_nll_is_stable_for_large_logits() -> None:
    lik = CPOLikelihood(beta=0.1)  # summed log-probs: logits of hundreds of nats
    st = make_stats(seed=15, reference=False)
    assert lik.logits(st).abs().max() > 50
    out = lik.policy_loss(st, torch.full((64,), 0.5, dtype=DTYPE), "nll")
    assert torch.isfinite(out).all()


def test_cpo_keep_sft_term() -> None:
    st = make_stats(seed=16, reference=False)
    w = torch.rand(64, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    plain = CPOLikelihood(beta=0.1)
    kept = CPOLikelihood(beta=0.1, nll_weight=0.5, keep_sft_term=True)
    s = kept.logits(st)
    bce = F.binary_cross_entropy_with_logits(s, w, reduction="none")
    sft = w * (-st.policy_a) + (1 - w) * (-st.policy_b)
    torch.testing.assert_close(kept.policy_loss(st, w, "nll"), bce + 0.5 * sft)
    torch.testing.assert_close(
        plain.policy_loss(st, w, "nll"),
        F.binary_cross_entropy_with_logits(plain.logits(st), w, reduction="none"),
    )
    # the mixture is soft-label preference loss on beta * delta plus the w-weighted SFT term
    delta = st.policy_a - st.policy_b
    pref = F.binary_cross_entropy_with_logits(0.1 * delta, w, reduction="none")
    torch.testing.assert_close(plain.policy_loss(st, w, "mixture"), pref + sft)
    torch.testing.assert_close(kept.policy_loss(st, w, "nll"), kept.policy_loss(st, w))  # default


def test_default_variants() -> None:
    # CPO: the literal EM step, its SFT term dropped (docs/experiments/noise-sweep.md);
    # SimPO: the exact step, which never trains a pair away from its label (docs/math.md)
    assert DPOLikelihood().default_variant == CPOLikelihood().default_variant == "nll"
    assert SimPOLikelihood().default_variant == "nll"
    for lik in (IPOLikelihood(), HingeLikelihood()):
        assert lik.default_variant == "mixture"
    st = make_stats(seed=17)
    lik = IPOLikelihood(beta=0.1)
    w = torch.full((64,), 0.9, dtype=DTYPE)
    torch.testing.assert_close(lik.policy_loss(st, w), lik.policy_loss(st, w, "mixture"))
    with pytest.raises(ValueError, match="variant"):
        lik.policy_loss(st, w, "bogus")


# --------------------------------------------------------------------------- rewards


def test_rewards_follow_trl() -> None:
    st = make_stats(seed=18)
    ra, rb = DPOLikelihood(beta=0.2).rewards(st)
    torch.testing.assert_close(ra, 0.2 * (st.policy_a - st.reference_a))
    torch.testing.assert_close(rb, 0.2 * (st.policy_b - st.reference_b))
    ra, _ = IPOLikelihood(beta=0.2).rewards(st)
    torch.testing.assert_close(ra, 0.2 * (st.policy_a - st.reference_a))
    ra, rb = SimPOLikelihood(beta=2.0).rewards(st)
    torch.testing.assert_close(ra, 2.0 * st.policy_a / st.length_a)
    torch.testing.assert_close(rb, 2.0 * st.policy_b / st.length_b)
    ra, rb = CPOLikelihood(beta=0.1).rewards(st)
    torch.testing.assert_close(ra, 0.1 * st.policy_a)
    torch.testing.assert_close(rb, 0.1 * st.policy_b)
    st_g = make_stats(seed=18, requires_grad=True)
    assert not DPOLikelihood().rewards(st_g)[0].requires_grad


# --------------------------------------------------------------------------- user losses


def test_induced_likelihood_from_user_lambda() -> None:
    beta = 0.4
    # a squared-hinge loss on summed log-probs, written inline
    lik = InducedLikelihood(lambda st: F.relu(1 - beta * (st.policy_a - st.policy_b)) ** 2)
    st = make_stats(seed=19, reference=False, requires_grad=True)
    assert not lik.likelihood_style and lik.default_variant == "mixture"
    m = beta * (st.policy_a - st.policy_b)
    expected = F.relu(1 + m) ** 2 - F.relu(1 - m) ** 2
    torch.testing.assert_close(lik.logits(st), expected)
    w = torch.rand(64, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    out = lik.policy_loss(st, w, "nll")
    out.sum().backward()
    assert st.policy_a.grad is not None and torch.isfinite(st.policy_a.grad).all()
    ra, rb = lik.rewards(st)
    torch.testing.assert_close(ra, st.policy_a.detach())


def test_induced_likelihood_reproduces_dpo() -> None:
    beta = 0.3
    user = InducedLikelihood(
        lambda st: -F.logsigmoid(beta * (st.log_ratio_a - st.log_ratio_b)),
        needs_reference=True,
        likelihood_style=True,
    )
    dpo = DPOLikelihood(beta)
    st = make_stats(seed=20)
    assert user.default_variant == "nll"
    torch.testing.assert_close(user.logits(st), dpo.logits(st))
    w = torch.rand(64, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    torch.testing.assert_close(user.policy_loss(st, w), dpo.policy_loss(st, w))
    with pytest.raises(ValueError, match="reference"):
        user.logits(make_stats(reference=False))


# --------------------------------------------------------------------------- registry and errors


def test_registry() -> None:
    assert available_likelihoods() == (
        "dpo",
        "ipo",
        "simpo",
        "cpo",
        "hinge",
        "cdpo",
        "rdpo",
        "holder_dpo",
    )
    lik = get_likelihood("SimPO", beta=2.5, gamma=1.0)
    assert isinstance(lik, SimPOLikelihood) and lik.beta == 2.5 and lik.gamma == 1.0
    for name in available_likelihoods():
        assert get_likelihood(name).name == name
    with pytest.raises(ValueError, match="dpo, ipo, simpo, cpo, hinge, cdpo, rdpo, holder_dpo"):
        get_likelihood("kto")
    with pytest.raises(ValueError, match="bad arguments"):
        get_likelihood("dpo", gamma=1.0)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: DPOLikelihood(beta=0.0),
        lambda: DPOLikelihood(beta=-1.0),
        lambda: DPOLikelihood(beta=math.inf),
        lambda: DPOLikelihood(beta=math.nan),
        lambda: DPOLikelihood(beta="0.1"),
        lambda: IPOLikelihood(beta=0),
        lambda: SimPOLikelihood(beta=-2.0),
        lambda: SimPOLikelihood(gamma=-0.5),
        lambda: CPOLikelihood(beta=0.0),
        lambda: CPOLikelihood(nll_weight=-1.0),
        lambda: HingeLikelihood(beta=-0.1),
        lambda: CDPOLikelihood(epsilon=0.6),
        lambda: CDPOLikelihood(epsilon=-0.1),
        lambda: RDPOLikelihood(epsilon=0.5),
        lambda: HolderDPOLikelihood(gamma=0.0),
        lambda: HolderDPOLikelihood(beta=0.0),
        lambda: InducedLikelihood(fn=3.0),
        lambda: InducedLikelihood(lambda st: st.policy_a, default_variant="bogus"),
    ],
)
def test_bad_arguments_raise(factory) -> None:
    with pytest.raises(ValueError):
        factory()


def test_missing_reference_raises() -> None:
    st = make_stats(reference=False)
    for lik in (
        DPOLikelihood(),
        IPOLikelihood(),
        HingeLikelihood(),
        CDPOLikelihood(),
        HolderDPOLikelihood(),
    ):
        with pytest.raises(ValueError, match="reference"):
            lik.loss(st)
        with pytest.raises(ValueError, match="reference"):
            lik.policy_loss(st, 1.0)
