"""Annotator-channel labels, the broadcast log ring and the layout's sums, against
the plain per-label forms they replace."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.rings import LogRing

from repo.inference.enumeration import BroadcastLogRing, enumerate_posterior
from repo.noise import LabelData, TwoCoin
from repo.noise.base import label_likelihood
from repo.noise.channel import AnnotatorLabels


def _ragged(seed: int, n: int = 900, k: int = 7, items: int = 250) -> LabelData:
    g = torch.Generator().manual_seed(seed)
    item = torch.randint(0, items, (n,), generator=g)
    annotator = torch.randint(0, k, (n,), generator=g)
    label = torch.randint(0, 2, (n,), generator=g).double()
    return LabelData.from_labels(annotator, label, item, shared_truth=True, num_annotators=k)


def _table(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(2, k, generator=g, dtype=torch.float64)


def _reference(logits: torch.Tensor, truth: torch.Tensor, data: LabelData, value: torch.Tensor):
    """``label_likelihood(logits[z, k], data)``: one logit per label slot."""
    per_slot = logits[truth.long().unsqueeze(-1), data.annotator]
    return label_likelihood(per_slot, data).log_prob(value)


@pytest.mark.parametrize("truth_shape", ["enumerated", "per-unit"])
def test_log_prob_equals_per_label_bernoulli(truth_shape):
    data = _ragged(0)
    assert data.slot_mask is not True  # padding is exercised
    logits = _table(data.num_annotators, 1)
    if truth_shape == "enumerated":
        truth = torch.tensor([0.0, 1.0]).reshape(2, 1, 1)
    else:
        truth = torch.randint(0, 2, (data.num_units,), generator=torch.Generator().manual_seed(2))
    labels = AnnotatorLabels(logits, truth, data)
    expected = _reference(logits, truth, data, data.label)
    assert labels.batch_shape == expected.shape
    assert torch.allclose(labels.log_prob(data.label), expected, atol=1e-12)
    # other values than the observed labels (a fresh look-up code)
    flipped = torch.where(data.mask, 1 - data.label, data.label)
    expected = _reference(logits, truth, data, flipped)
    assert torch.allclose(labels.log_prob(flipped), expected, atol=1e-12)


def test_log_prob_is_differentiable_in_the_table():
    data = _ragged(3)
    logits = _table(data.num_annotators, 4).requires_grad_()
    truth = torch.tensor([0.0, 1.0]).reshape(2, 1)
    AnnotatorLabels(logits, truth, data).log_prob(data.label).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    _reference(reference, truth, data, data.label).sum().backward()
    assert torch.allclose(logits.grad, reference.grad, atol=1e-10)


def test_sample_expand_and_shape_errors():
    data = _ragged(5)
    logits = torch.tensor([[-30.0] * data.num_annotators, [30.0] * data.num_annotators])
    truth = torch.randint(0, 2, (data.num_units,), generator=torch.Generator().manual_seed(6))
    labels = AnnotatorLabels(logits.double(), truth, data)
    draw = labels.sample()
    assert draw.shape == data.label.shape
    # near-deterministic channel: every real slot reports the truth, padding is 0
    expected = torch.where(data.mask, truth.unsqueeze(-1).double().expand_as(draw), 0.0)
    assert torch.equal(draw, expected)
    wide = AnnotatorLabels(logits.double(), torch.tensor([[0.0], [1.0]]), data).expand(
        (2, data.num_units)
    )
    assert wide.batch_shape == (2, data.num_units)
    assert wide.log_prob(data.label).shape == (2, data.num_units)
    with pytest.raises(ValueError, match="K >= 7"):
        AnnotatorLabels(torch.zeros(2, 3, dtype=torch.float64), truth, data)


def test_two_coin_posterior_through_the_channel_equals_enumerating_per_label_logits():
    """The same model written with per-label logits gives the same E-step."""
    data = _ragged(7)
    k = data.num_annotators
    model = TwoCoin(k)
    g = torch.Generator().manual_seed(8)
    model.eta_a = 0.55 + 0.4 * torch.rand(k, generator=g, dtype=torch.float64)
    model.eta_b = 0.55 + 0.4 * torch.rand(k, generator=g, dtype=torch.float64)
    logits = torch.randn(data.num_units, generator=g, dtype=torch.float64)
    ea, eb = model.eta_a.detach(), model.eta_b.detach()

    def per_label_model(logits, data):
        with pyro.plate("items", data.num_units, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=logits), infer={"enumerate": "parallel"})
            k = data.annotator
            label_logits = torch.where(
                z.unsqueeze(-1) > 0.5, torch.logit(ea)[k], -torch.logit(eb)[k]
            )
            pyro.sample("o", label_likelihood(label_logits, data), obs=data.label)

    ours = enumerate_posterior(model.model, logits, data)
    reference = enumerate_posterior(per_label_model, logits, data)
    assert torch.allclose(ours.marginals["z"], reference.marginals["z"], atol=1e-12)
    assert torch.allclose(ours.log_likelihood, reference.log_likelihood, atol=1e-12)


def _packed(tensor: torch.Tensor, dims: str) -> torch.Tensor:
    tensor._pyro_dims = dims
    return tensor


@pytest.mark.parametrize(
    "shapes, dims",
    [
        ((("ab", (2, 9)), ("ab", (2, 9))), set()),
        ((("ab", (2, 9)), ("ba", (9, 2))), {"a"}),
        ((("abc", (2, 3, 9)), ("ac", (2, 9)), ("bc", (3, 9))), {"a", "b"}),
        ((("ba", (9, 2)),), set()),
        ((("ba", (9, 2)),), {"a"}),
    ],
)
def test_broadcast_ring_equals_the_einsum_ring(shapes, dims):
    g = torch.Generator().manual_seed(9)
    terms = []
    for names, shape in shapes:
        value = torch.randn(shape, generator=g, dtype=torch.float64)
        value[(0,) * len(shape)] = -torch.inf  # an impossible configuration
        terms.append((names, value))
    ours = BroadcastLogRing().sumproduct([_packed(v.clone(), n) for n, v in terms], dims)
    reference = LogRing().sumproduct([_packed(v.clone(), n) for n, v in terms], dims)
    order = [ours._pyro_dims.index(d) for d in reference._pyro_dims]
    assert sorted(ours._pyro_dims) == sorted(reference._pyro_dims)
    assert torch.allclose(ours.permute(order), reference, atol=1e-12)


def test_broadcast_ring_defers_when_no_term_spans_every_dim():
    a = _packed(torch.randn(2, 5, dtype=torch.float64), "ac")
    b = _packed(torch.randn(3, 5, dtype=torch.float64), "bc")
    ours = BroadcastLogRing().sumproduct([a, b], {"a", "b"})
    reference = LogRing().sumproduct([a, b], {"a", "b"})
    assert ours._pyro_dims == reference._pyro_dims == "c"
    assert torch.allclose(ours, reference, atol=1e-12)


def test_per_annotator_sum_and_flat_against_loops():
    data = _ragged(10)
    g = torch.Generator().manual_seed(11)
    values = torch.randn(data.label.shape + (3,), generator=g, dtype=torch.float64)
    sums = data.per_annotator_sum(values)
    expected = torch.zeros(data.num_annotators, 3, dtype=torch.float64)
    for i, s in data.mask.nonzero().tolist():
        expected[data.annotator[i, s]] += values[i, s]
    assert torch.allclose(sums, expected, atol=1e-12)
    assert torch.allclose(data.per_annotator_sum(values[..., 0]), expected[:, 0], atol=1e-12)
    counts = data.label_counts()
    counts += 1  # a copy: the cached counts are not changed
    assert torch.equal(data.label_counts(), data.per_annotator_sum(data.mask.double()))
    flat = data.flat(data.row.double())
    assert torch.equal(flat, torch.arange(data.num_labels, dtype=torch.float64))


def test_log_prob_of_values_with_sample_dims_and_a_wider_table():
    data = _ragged(12)
    k = data.num_annotators
    g = torch.Generator().manual_seed(13)
    values = torch.randint(0, 2, (3,) + tuple(data.label.shape), generator=g).double()
    per_unit = torch.randint(0, 2, (data.num_units,), generator=g)
    enumerated = torch.tensor([0.0, 1.0]).reshape(2, 1)
    wide = torch.cat([_table(k, 14), torch.zeros(2, 4, dtype=torch.float64)], dim=1)  # K + 4
    for truth, value in ((per_unit, values), (enumerated, values.unsqueeze(1))):
        labels = AnnotatorLabels(wide, truth, data)
        expected = _reference(wide, truth, data, value)
        assert labels.log_prob(value).shape == expected.shape
        assert torch.allclose(labels.log_prob(value), expected, atol=1e-12)
    scalar = AnnotatorLabels(wide, torch.tensor(1.0), data)
    assert scalar.batch_shape == (data.num_units,)
    expected = _reference(wide, torch.ones(data.num_units), data, data.label)
    assert torch.allclose(scalar.log_prob(data.label), expected, atol=1e-12)


def test_per_annotator_sum_of_no_labels_is_zero():
    empty = torch.zeros(0, dtype=torch.long)
    data = LabelData.from_labels(empty, empty.double(), num_annotators=4)
    assert torch.equal(data.label_counts(), torch.zeros(4, dtype=torch.float64))
    stats = data.per_annotator_sum(torch.zeros(0, 1, 3, dtype=torch.float64))
    assert torch.equal(stats, torch.zeros(4, 3, dtype=torch.float64))
