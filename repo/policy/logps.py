r"""Response log-probabilities of a causal LM, from one forward over 2B sequences.

For a sequence ``y`` (prompt ``x`` followed by response ``r``) the model's
next-token distribution at position ``t-1`` scores token ``y_t``:

.. math::

    \log \pi(r \mid x) = \sum_{t \in \text{response}} \log \mathrm{softmax}(z_{t-1})[y_t],
    \qquad |r| = \#\{t \in \text{response}\},

with ``z`` the logits. Prompt and padding positions are masked out by the batch's
``response_mask``; a response token at position 0 has no predecessor and is not
scored. The mean log-prob is ``sum / |r|`` (SimPO's length-normalised score).

Memory: only the positions from the first response token onwards are projected
to the vocabulary (``logits_to_keep`` where the model supports it), only response
positions are gathered, and the log-softmax runs in float32 over row chunks; for
low-precision logits each chunk is recomputed in the backward pass
(``torch.utils.checkpoint``) instead of keeping a float32 copy of the logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ResponseLogps",
    "pair_logps",
    "sequence_logps",
    "shared_prompt_logps",
    "shared_prompt_mask",
    "split_pair",
    "token_logps",
]


class ResponseLogps(NamedTuple):
    """Summed response log-probs and token counts of A and B, each of shape (B,)."""

    logp_a: torch.Tensor
    logp_b: torch.Tensor
    len_a: torch.Tensor
    len_b: torch.Tensor

    @property
    def mean_a(self) -> torch.Tensor:
        """Length-normalised log-prob of A: ``logp_a / len_a`` (0 for an empty response)."""
        return self.logp_a / self.len_a.clamp_min(1)

    @property
    def mean_b(self) -> torch.Tensor:
        """Length-normalised log-prob of B: ``logp_b / len_b``."""
        return self.logp_b / self.len_b.clamp_min(1)

    def detach(self) -> ResponseLogps:
        return ResponseLogps(*(t.detach() for t in self))

    def to_stats(self, reference: ResponseLogps | None = None):
        """These (policy) log-probs with optional ``reference`` ones as the loss
        families' :class:`repo.likelihoods.stats.PairLogps`."""
        from repo.likelihoods.stats import PairLogps

        return PairLogps(
            policy_a=self.logp_a,
            policy_b=self.logp_b,
            length_a=self.len_a,
            length_b=self.len_b,
            reference_a=None if reference is None else reference.logp_a,
            reference_b=None if reference is None else reference.logp_b,
        )


def split_pair(sum_logps: torch.Tensor, lengths: torch.Tensor) -> ResponseLogps:
    """Split the concatenated (2B,) outputs of :func:`sequence_logps` into A (first B) and B."""
    if sum_logps.shape[0] % 2:
        raise ValueError(f"expected an even number of sequences, got {sum_logps.shape[0]}")
    half = sum_logps.shape[0] // 2
    return ResponseLogps(sum_logps[:half], sum_logps[half:], lengths[:half], lengths[half:])


def _chunk_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lg = logits.float()
    picked = lg.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(lg, dim=-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """``log softmax(logits)[label]`` in float32 for rows of ``logits`` (N, V) and ``labels`` (N,).

    Rows are processed ``chunk_size`` at a time; for non-float32 logits that need a
    gradient each chunk is checkpointed, so its float32 upcast is not kept for backward.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    recompute = logits.requires_grad and logits.dtype != torch.float32
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        lg = logits[start : start + chunk_size]
        lb = labels[start : start + chunk_size]
        if recompute:
            out.append(checkpoint(_chunk_logps, lg, lb, use_reentrant=False))
        else:
            out.append(_chunk_logps(lg, lb))
    return torch.cat(out)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    target = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):  # peft wrappers forward **kwargs to the base model
        target = get_base()
    try:
        return "logits_to_keep" in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def sequence_logps(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths of every sequence in ``batch``.

    ONE forward of ``model`` over ``batch["input_ids"]`` (N, T) with
    ``batch["attention_mask"]``; returns ``(sum_logps, lengths)``, both float32 of
    shape (N,): ``sum_logps[n] = sum_t response_mask[n, t] * log p(y_t | y_<t)`` over
    t >= 1 and ``lengths[n]`` the number of such tokens. Mean log-probs are
    ``sum_logps / lengths``. For a collated pair batch N = 2B, A first
    (:func:`split_pair`). Gradients flow when grad is enabled.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    target_mask = batch["response_mask"][:, 1:].bool()  # token t scored at position t-1
    n, T = input_ids.shape
    if attention_mask is not None:
        target_mask = target_mask & attention_mask[:, 1:].bool()
    lengths = target_mask.sum(dim=1).to(torch.float32)
    cols = target_mask.any(dim=0).nonzero()
    if cols.numel() == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=input_ids.device)
        return zeros, lengths
    start = int(cols[0, 0])  # first predicting position with a target

    kwargs: dict[str, object] = {"attention_mask": attention_mask, "use_cache": False}
    keep_tail = T - start  # positions start .. T-1
    trimmed = start > 0 and _accepts_logits_to_keep(model)
    if trimmed:
        kwargs["logits_to_keep"] = keep_tail
    logits = model(input_ids=input_ids, **kwargs).logits
    if not trimmed:
        logits = logits[:, start:]
    logits = logits[:, :-1]  # positions start .. T-2 predict tokens start+1 .. T-1
    labels = input_ids[:, start + 1 :]
    mask = target_mask[:, start:]

    rows = mask.nonzero(as_tuple=True)[0]
    tok = token_logps(logits[mask], labels[mask], chunk_size=chunk_size)
    sums = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, rows, tok)
    return sums, lengths.to(sums.device)


def shared_prompt_mask(segment: torch.Tensor, pair: torch.Tensor | None = None) -> torch.Tensor:
    """The attention mask (R, 1, T, T) of :func:`~repo.policy.tokenize.collate_shared_prompt`
    rows: causal within each pair's block (``pair``; default: one block a row), except
    that response B does not see response A; padding sees only itself (keeps the softmax
    finite; its outputs are never read). True = attend."""
    from repo.policy.tokenize import PADDING, RESPONSE_A, RESPONSE_B

    T = segment.shape[1]
    position = torch.arange(T, device=segment.device)
    causal = position[None, :] <= position[:, None]  # (T, T): key <= query
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & (key != PADDING) & ~((query == RESPONSE_B) & (key == RESPONSE_A))
    if pair is not None:
        allowed &= pair[:, :, None] == pair[:, None, :]
    allowed = allowed | ((query == PADDING) & torch.eye(T, dtype=torch.bool, device=segment.device))
    return allowed.unsqueeze(1)


def shared_prompt_logps(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and lengths of A and B from ``[prompt | A | B]`` blocks.

    ONE forward of ``model`` over the blocks of
    :func:`~repo.policy.tokenize.collate_shared_prompt` (one or more blocks a row) with
    their position ids and :func:`shared_prompt_mask`; returns ``(sum_logps, lengths)``
    of shape (2B,) in :func:`sequence_logps`' order (the B responses A, then the B
    responses B), so :func:`split_pair` applies. Equal to :func:`sequence_logps` on the
    :func:`~repo.policy.tokenize.collate_pairs` layout of the same pairs.

    Padding-free: for a model with ``sdpa`` or ``eager`` attention the blocks' tokens,
    without the rows' padding, run as ONE row of N tokens with
    :func:`~repo.policy.attention.block_attention` (each block attends within itself at
    the cost of a separate sequence), and the vocabulary projection runs only at the
    positions that score a response token. Other models run the rows as they are, with
    the rows' 4-D mask.
    """
    from repo.policy.attention import supports_block_attention

    if supports_block_attention(model):
        return _packed_logps(model, batch, chunk_size=chunk_size)
    return _rows_logps(model, batch, chunk_size=chunk_size)


def _pair_count(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["index"].shape[0]) if "pair" in batch else int(batch["input_ids"].shape[0])


def _slot_sums(tok: torch.Tensor, owner: torch.Tensor, is_b: torch.Tensor, n: int):
    """Token log-probs summed per response: A of pair i -> slot i, B of pair i -> n + i."""
    slot = owner + n * is_b.long()
    sums = torch.zeros(2 * n, dtype=torch.float32, device=tok.device).index_add(0, slot, tok)
    ones = torch.ones_like(tok)
    lengths = torch.zeros(2 * n, dtype=torch.float32, device=tok.device).index_add(0, slot, ones)
    return sums, lengths


def _packed_logps(
    model: nn.Module, batch: Mapping[str, torch.Tensor], *, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shared_prompt_logps` as one padding-free row with block attention."""
    from repo.policy.attention import BlockLayout, blocks_forward
    from repo.policy.tokenize import PADDING, RESPONSE_A, RESPONSE_B

    input_ids, segment, source = batch["input_ids"], batch["segment"], batch["source"]
    rows_n, T = input_ids.shape
    device = input_ids.device
    pair = batch.get("pair")  # absent: one pair a row, in order
    if pair is None:
        pair = torch.arange(rows_n, device=device)[:, None].expand(rows_n, T)
    flat = (segment != PADDING).flatten().nonzero().squeeze(1)  # the real tokens, in order
    N = flat.shape[0]
    packed = torch.full((rows_n * T,), -1, dtype=torch.long, device=device)
    packed[flat] = torch.arange(N, device=device)  # row slot -> packed position
    ids, seg = input_ids.flatten()[flat], segment.flatten()[flat]
    owner = pair.flatten()[flat]
    row_source = source.flatten()[flat]
    src = torch.where(
        row_source >= 0, packed[(flat // T) * T + row_source.clamp_min(0)], row_source
    )  # the packed position whose output scores each token
    scored = ((seg == RESPONSE_A) | (seg == RESPONSE_B)) & (src >= 0)
    n = _pair_count(batch)
    if not bool(scored.any()):
        zeros = torch.zeros(2 * n, dtype=torch.float32, device=device)
        return zeros, zeros.clone()

    def mask(slot_token: torch.Tensor) -> torch.Tensor:
        slot_segment = torch.where(slot_token >= 0, seg[slot_token.clamp_min(0)], PADDING)
        return shared_prompt_mask(slot_segment)

    layout = BlockLayout.from_blocks(owner, mask)
    kwargs: dict[str, object] = {
        "position_ids": batch["position_ids"].flatten()[flat][None],
        "use_cache": False,
    }
    predictors = src[scored]
    keep = torch.unique(predictors)  # sorted
    trimmed = _accepts_logits_to_keep(model)
    if trimmed:
        kwargs["logits_to_keep"] = keep
    with blocks_forward(model, layout) as attention:
        logits = model(input_ids=ids[None], **kwargs, **attention).logits[0]
    rows = torch.searchsorted(keep, predictors) if trimmed else predictors
    tok = token_logps(logits[rows], ids[scored], chunk_size=chunk_size)
    return _slot_sums(tok, owner[scored], seg[scored] == RESPONSE_B, n)


def _rows_logps(
    model: nn.Module, batch: Mapping[str, torch.Tensor], *, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shared_prompt_logps` over the batch's rows with their 4-D mask."""
    from repo.policy.tokenize import RESPONSE_A, RESPONSE_B

    input_ids, segment, source = batch["input_ids"], batch["segment"], batch["source"]
    T = input_ids.shape[1]
    pair = batch.get("pair")  # absent: one pair a row, in order
    scored = (segment == RESPONSE_A) | (segment == RESPONSE_B)
    scored &= source >= 0  # a response token at a block's start has no predecessor
    kwargs: dict[str, object] = {
        "attention_mask": shared_prompt_mask(segment, pair),
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    start = int(source[scored].min()) if scored.any() else T - 1
    trimmed = start > 0 and _accepts_logits_to_keep(model)
    if trimmed:
        kwargs["logits_to_keep"] = T - start
    logits = model(input_ids=input_ids, **kwargs).logits
    offset = start if trimmed else 0
    rows, cols = scored.nonzero(as_tuple=True)
    tok = token_logps(
        logits[rows, source[rows, cols] - offset], input_ids[rows, cols], chunk_size=chunk_size
    )
    owner = rows if pair is None else pair[rows, cols]
    return _slot_sums(tok, owner, segment[rows, cols] == RESPONSE_B, _pair_count(batch))


def pair_logps(
    model: nn.Module, batch: Mapping[str, torch.Tensor], *, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shared_prompt_logps` or :func:`sequence_logps`, as the batch's layout says."""
    if "segment" in batch:
        return shared_prompt_logps(model, batch, chunk_size=chunk_size)
    return sequence_logps(model, batch, chunk_size=chunk_size)
