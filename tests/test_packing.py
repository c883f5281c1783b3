"""Padding-free packing of ``[prompt | A | B]`` blocks: packed rows give the same
per-sequence log-probs (and gradients) as the padded 2B-row layout."""

from __future__ import annotations

import pytest
import torch

from repo.policy import Policy, collate_pairs, collate_shared_prompt
from repo.policy.logps import sequence_logps, shared_prompt_logps
from repo.policy.tokenize import TokenizedPair, pack_rows


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    policy = Policy.from_recipe("tiny-llama", device="cpu", layout="shared-prompt")
    for name, p in policy.lm.named_parameters():  # LoRA B starts at zero: make it count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return policy


def _pairs(sizes, seed=0):
    """Pairs with (prompt, A, B) lengths ``sizes`` and random ids."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(3, 500, (n,), generator=g).tolist())

    return [TokenizedPair(i, ids(p), ids(a), ids(b)) for i, (p, a, b) in enumerate(sizes)]


# the first block fills a row; the short ones share rows; one has no prompt, so its
# first response tokens have no predecessor (not scored) even in the middle of a row
SIZES = [(20, 14, 9), (5, 4, 6), (3, 7, 2), (0, 5, 4), (6, 3, 3), (4, 9, 1)]


def test_pack_rows_first_fit_decreasing():
    lengths = [43, 15, 12, 9, 12, 14]
    rows = pack_rows(lengths, 43)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 43 for row in rows)
    assert rows == [[0], [1, 5, 2], [4, 3]]


def test_packed_rows_hold_several_pairs():
    batch = collate_shared_prompt(_pairs(SIZES), 0)
    assert batch["input_ids"].shape == (3, 43)  # 6 pairs in 3 rows, no longer than the longest
    real = sum(sum(s) for s in SIZES)
    assert int((batch["pair"] >= 0).sum()) == real
    assert batch["index"].tolist() == list(range(len(SIZES)))


def test_packed_and_padded_log_probs_agree(policy):
    pairs = _pairs(SIZES)
    with torch.no_grad():
        packed, packed_len = shared_prompt_logps(policy.lm, collate_shared_prompt(pairs, 0))
        padded, padded_len = sequence_logps(policy.lm, collate_pairs(pairs, 0))
    assert torch.equal(packed_len, padded_len)
    assert packed_len[3].item() == 4 and packed_len[3 + len(pairs)].item() == 3
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_packed_rows_of_a_set_length_agree(policy):
    pairs = _pairs(SIZES, seed=1)
    with torch.no_grad():
        one_row, _ = shared_prompt_logps(policy.lm, collate_shared_prompt(pairs, 0, row_length=200))
        padded, _ = sequence_logps(policy.lm, collate_pairs(pairs, 0))
    torch.testing.assert_close(one_row, padded, rtol=0, atol=1e-5)


def test_packed_and_padded_gradients_agree(policy):
    pairs = _pairs(SIZES, seed=2)
    weights = torch.linspace(-1.0, 1.0, 2 * len(pairs))
    grads = []
    for logps, batch in (
        (shared_prompt_logps, collate_shared_prompt(pairs, 0)),
        (sequence_logps, collate_pairs(pairs, 0)),
    ):
        policy.lm.zero_grad(set_to_none=True)
        sums, _ = logps(policy.lm, batch)
        (weights * sums).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
