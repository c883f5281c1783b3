"""Padding-free packing of ``[prompt | A | B]`` blocks: the blocks run as one row of real
tokens with block attention, and give the same per-sequence log-probs, DPO loss and
gradients as the padded 2B-row layout."""

from __future__ import annotations

import pytest
import torch

from repo.likelihoods import get_likelihood
from repo.policy import Policy, collate_pairs, collate_shared_prompt
from repo.policy.attention import BlockLayout, blocks_forward, supports_block_attention
from repo.policy.logps import _rows_logps, sequence_logps, shared_prompt_logps
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


def test_the_forward_sees_the_real_tokens_only(policy):
    """One row of the blocks' tokens, no padding, whatever the collated rows hold."""
    pairs = _pairs(SIZES, seed=3)
    batch = collate_shared_prompt(pairs, 0)
    shapes = []
    embed = policy.lm.get_base_model().get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            shared_prompt_logps(policy.lm, batch)
    finally:
        hook.remove()
    assert shapes == [(1, sum(sum(s) for s in SIZES))]
    assert batch["input_ids"].numel() > shapes[0][1]  # the rows had padding
    assert policy.lm.get_base_model().config._attn_implementation == "sdpa"  # restored


def test_block_attention_equals_the_masked_rows(policy):
    """Block attention (each block apart) gives the numbers of the rows' 4-D mask."""
    pairs = _pairs(SIZES, seed=4)
    batch = collate_shared_prompt(pairs, 0)
    with torch.no_grad():
        packed, packed_len = shared_prompt_logps(policy.lm, batch)
        rows, rows_len = _rows_logps(policy.lm, batch, chunk_size=4096)
    assert torch.equal(packed_len, rows_len)
    torch.testing.assert_close(packed, rows, rtol=0, atol=1e-5)


def test_dpo_loss_and_gradient_agree_across_layouts(policy):
    """The DPO loss (policy against the adapter-free reference) and its gradient are the
    same from packed ``[prompt | A | B]`` blocks as from padded 2B rows."""
    pairs = _pairs(SIZES, seed=5)
    dpo = get_likelihood("dpo", beta=0.1)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    losses, grads = [], []
    for batch in (collate_shared_prompt(pairs, 0), collate_pairs(pairs, 0)):
        policy.lm.zero_grad(set_to_none=True)
        stats = policy(batch).to_stats(policy.reference_logps(batch))
        loss = dpo.policy_loss(stats, labels, "mixture").sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_block_layout_of_a_row():
    block = torch.tensor([4, 4, 4, 1, 1, 7])
    layout = BlockLayout.from_blocks(block, lambda slots: slots)
    assert layout.index.tolist() == [[0, 1, 2], [3, 4, 3], [5, 5, 5]]
    assert layout.valid.tolist() == [[True] * 3, [True, True, False], [True, False, False]]
    assert layout.mask.tolist() == [[0, 1, 2], [3, 4, -1], [5, -1, -1]]  # -1: empty slots
    assert layout.index[layout.valid].tolist() == list(range(6))


def test_a_model_that_ignores_the_attention_interface_is_refused():
    class Plain(torch.nn.Module):  # no attention layer reads the interface
        def forward(self, **kwargs):
            return kwargs

    layout = BlockLayout.from_blocks(torch.zeros(3, dtype=torch.long), lambda s: s)
    with pytest.raises(RuntimeError, match="attention interface"):
        with blocks_forward(Plain(), layout) as kwargs:
            Plain()(**kwargs)


def test_gradient_checkpointing_takes_the_masked_rows():
    """Gradient checkpointing reruns each layer in the backward pass, after the block
    attention was switched off: such a model is scored through the masked rows, with
    the gradient of the model without checkpointing."""
    pairs = _pairs(SIZES, seed=5)
    batch = collate_shared_prompt(pairs, 0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = Policy.from_recipe("tiny-llama", device="cpu", layout="shared-prompt")
        if checkpointing:
            policy.lm.get_base_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        assert supports_block_attention(policy.lm) is not checkpointing
        policy.lm.train()
        sums, _ = shared_prompt_logps(policy.lm, batch)
        sums.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
