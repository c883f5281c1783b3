r"""Block attention: padding-free packed sequences with the attention cost of separate ones.

A row that holds K blocks (sequences) of lengths :math:`L_1, \dots, L_K`, :math:`N = \sum_k L_k`
tokens in all, runs its linear layers over the N tokens only (no padding), but a masked
attention over the row would still cost :math:`N^2` (every masked entry is computed).
Block attention gathers each block's queries, keys and values into a padded batch
``(K, H, L, d)`` (:math:`L = \max_k L_k`), runs ONE ``scaled_dot_product_attention`` with
each block's own mask ``(K, 1, L, L)``, and takes the outputs of the real tokens back in
their order, so the attention costs :math:`K L^2` and no entry of it crosses blocks: it is
the attention of the blocks run as separate (padded) sequences, the same numbers.

It runs through ``transformers``' attention interface: :func:`block_attention` is
registered under :data:`BLOCK_ATTENTION`, and :func:`blocks_forward` switches a model to it
for one forward, passing the :class:`BlockLayout` down to every attention layer as a
keyword argument. A model whose attention layers do not dispatch through the interface
is caught (the layout counts the calls) rather than run with the wrong mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BLOCK_ATTENTION",
    "BlockLayout",
    "block_attention",
    "blocks_forward",
    "supports_block_attention",
]

BLOCK_ATTENTION = "re-po-blocks"
"""The name :func:`block_attention` is registered under in ``transformers``' interface."""


@dataclass
class BlockLayout:
    """Where the blocks of one packed row lie, and how they attend.

    :param index: ``(K, L)`` int64: the row position of each block's ``l``-th token
        (slots past a block's end repeat its first position; they are masked).
    :param valid: ``(K, L)`` bool: the slots that hold a token. Blocks are consecutive and
        in order, so ``index[valid]`` is ``0, 1, ..., N - 1``.
    :param mask: ``(K, 1, L, L)`` bool: which key each query of a block attends to
        (True = attend); an empty slot must attend to something (itself), so that the
        softmax stays finite.
    """

    index: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    calls: int = 0

    @classmethod
    def from_blocks(cls, block: torch.Tensor, mask_fn) -> BlockLayout:
        """The layout of a row whose token ``n`` belongs to block ``block[n]`` (N,): each
        block a run of equal, consecutive values. ``mask_fn(slot_token)`` maps the
        ``(K, L)`` row positions of the slots (-1 for empty ones) to the ``(K, 1, L, L)``
        mask."""
        n = block.shape[0]
        starts = torch.ones(n, dtype=torch.bool, device=block.device)
        starts[1:] = block[1:] != block[:-1]
        start = starts.nonzero().squeeze(1)
        lengths = torch.diff(start, append=torch.tensor([n], device=block.device))
        longest = int(lengths.max())
        offset = torch.arange(longest, device=block.device)
        valid = offset[None, :] < lengths[:, None]
        index = torch.where(valid, start[:, None] + offset[None, :], start[:, None])
        slot_token = torch.where(valid, index, torch.full_like(index, -1))
        return cls(index=index, valid=valid, mask=mask_fn(slot_token))


def block_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    re_po_blocks: BlockLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of the blocks of ``re_po_blocks`` over one row (``query``, ``key``,
    ``value``: ``(1, H, N, d)``; returns ``(1, N, H, d)`` as ``transformers``' attention
    functions do). Without a layout it is ``transformers``' ``sdpa`` attention."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if re_po_blocks is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for name in ("softcap", "position_bias", "sliding_window"):
        if kwargs.get(name) is not None:
            raise ValueError(f"block attention does not support {name} (use the other layout)")
    if query.shape[0] != 1:
        raise ValueError(f"block attention takes one packed row, got {query.shape[0]}")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    layout = re_po_blocks
    layout.calls += 1

    def gather(t: torch.Tensor) -> torch.Tensor:  # (1, H, N, d) -> (K, H, L, d)
        return t[0].transpose(0, 1)[layout.index].transpose(1, 2)

    out = F.scaled_dot_product_attention(
        gather(query),
        gather(key),
        gather(value),
        attn_mask=layout.mask,
        dropout_p=dropout,
        scale=scaling,
    )
    return out.transpose(1, 2)[layout.valid].unsqueeze(0), None  # (1, N, H, d)


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(BLOCK_ATTENTION, block_attention)
        _registered = True


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (``model`` itself without one)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _configs(model: nn.Module) -> list:
    config = getattr(_base(model), "config", None)
    return [] if config is None else [config]


def _checkpointing(model: nn.Module) -> bool:
    base = _base(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def supports_block_attention(model: nn.Module) -> bool:
    """Whether ``model``'s attention is ``sdpa`` or ``eager`` (which block attention
    replaces with the same numbers) and it does not recompute activations: gradient
    checkpointing reruns each layer's forward in the backward pass, after
    :func:`blocks_forward` has switched the attention back."""
    configs = _configs(model)
    return (
        bool(configs)
        and not _checkpointing(model)
        and all(getattr(c, "_attn_implementation", None) in ("sdpa", "eager") for c in configs)
    )


@contextlib.contextmanager
def blocks_forward(model: nn.Module, layout: BlockLayout) -> Iterator[dict[str, object]]:
    """Run ``model`` with block attention inside the context: yields the keyword
    arguments to pass to its forward (the layout, and its mask as the 4-D
    ``attention_mask``, which ``transformers`` passes through as it is).

    :raises RuntimeError: on leaving, when no attention layer used the layout.
    """
    _register()
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    calls = layout.calls
    for c in configs:
        c._attn_implementation = BLOCK_ATTENTION
    try:
        yield {"attention_mask": layout.mask, "re_po_blocks": layout}
    finally:
        for c, name in zip(configs, before, strict=True):
            c._attn_implementation = name
    if layout.calls == calls:
        raise RuntimeError(
            f"{type(model).__name__}'s attention layers do not dispatch through transformers' "
            "attention interface: use the 'concatenated' layout"
        )
