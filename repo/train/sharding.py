"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``).

With ``[run] distributed = "fsdp"`` and several processes, the policy's network is
sharded the way accelerate's FSDP2 preparation shards a Hugging Face model: one FSDP
unit per transformer block (the classes the model names in ``_no_split_modules``),
then the whole network as the root unit. Every parameter, its gradient and AdamW's
moments then live as a ``DTensor`` shard of ``1 / N`` on each of the ``N`` processes;
a unit's parameters are all-gathered for its forward and backward and its gradients
reduce-scattered. The same code runs over NCCL on GPUs and over gloo on the CPU.

(accelerate 1.16 builds FSDP only on accelerator devices - its CPU state is always
plain multi-process - so re-po calls ``fully_shard`` itself, on the process group and
device accelerate set up; gradients, clipping and state dicts then go through
``torch.distributed``'s FSDP2 APIs, below.)

What the rest of the trainer needs from a sharded policy:

* :func:`clip_grad_norm` - the global gradient norm over all shards, and clipping;
* :func:`full_trainable_state` / :func:`full_model_state` - whole tensors on the main
  process (a collective: every process calls it), for checkpoints and the final
  ``save_pretrained`` folder;
* :func:`full_optimizer_state` / :func:`load_full_state` - AdamW's state as whole
  tensors keyed by parameter position (the checkpoint format of
  :mod:`repo.train.checkpoint`), and back into the shards on every process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "clip_grad_norm",
    "full_model_state",
    "full_optimizer_state",
    "full_trainable_state",
    "is_sharded",
    "load_full_state",
    "shard_blocks",
    "shard_policy",
]


def shard_blocks(network: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face network: modules of the classes its
    ``_no_split_modules`` names (``LlamaDecoderLayer``, ``MistralDecoderLayer``, ...).

    :raises ValueError: the network names none, or none of them is in it.
    """
    names = set(getattr(network, "_no_split_modules", None) or ())
    blocks = [m for m in network.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(network).__name__} names no transformer block class in _no_split_modules "
            f"({sorted(names)}); FSDP needs one unit per block"
        )
    return blocks


def shard_policy(policy: Any, device: torch.device | str) -> None:
    """Shard ``policy.lm`` in place over all processes of the default process group:
    ``fully_shard`` on every transformer block (:func:`shard_blocks`), then on the network.

    :param device: this process's device (the device mesh's type).
    """
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (get_world_size(),))
    network = policy.lm
    for block in shard_blocks(network):
        fully_shard(block, mesh=mesh)
    fully_shard(network, mesh=mesh)


def is_sharded(policy: Any) -> bool:
    """Whether the policy's network was sharded by :func:`shard_policy`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(policy.lm, FSDPModule)


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the gradients of sharded ``parameters`` to a global norm of ``max_norm``
    (``inf``: no clipping); the norm before clipping, the same on every process."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def _options(**kwargs: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(policy: Any) -> dict[str, Tensor]:
    """Every tensor of the network, whole, on the main process's CPU (an empty mapping
    on the others). A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(policy.lm, options=_options(cpu_offload=True))


def full_trainable_state(policy: Any) -> dict[str, Tensor]:
    """The trainable tensors, whole, by name (those of
    ``policy.named_trainable_parameters()``) on the main process's CPU; empty on the
    others. A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    options = _options(cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(policy.lm, options=options)


def full_optimizer_state(policy: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's ``state_dict`` with whole tensors, keyed by parameter position
    as an unsharded optimizer's is, on the main process (empty state on the others).
    A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(policy.lm, optimizer, options=_options(cpu_offload=True))
    if not state.get("param_groups"):
        return {"state": {}, "param_groups": []}
    position: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        names = list(group["params"])
        ids = [position.setdefault(name, len(position)) for name in names]
        groups.append({**group, "params": ids})
    return {
        "state": {position[name]: value for name, value in state["state"].items()},
        "param_groups": groups,
    }


def load_full_state(
    policy: Any,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Put whole trainable ``weights`` and a position-keyed ``optimizer_state`` (as
    :func:`full_trainable_state` and :func:`full_optimizer_state` give them, read by
    every process) into the shards. A collective.

    :raises ValueError: weights that are not this network's trainable tensors.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    expected = {n for n, _ in policy.named_trainable_parameters()}
    if set(weights) != expected:
        raise ValueError(
            f"the weights do not fit this model ({len(weights)} tensors for "
            f"{len(expected)} trainable ones)"
        )
    set_model_state_dict(policy.lm, weights, options=_options(strict=False))
    # the parameter names in the optimizer's order, as get_optimizer_state_dict gives them
    names = [
        name
        for group in get_optimizer_state_dict(policy.lm, optimizer)["param_groups"]
        for name in group["params"]
    ]
    groups = [
        {**group, "params": [names[i] for i in group["params"]]}
        for group in optimizer_state["param_groups"]
    ]
    state = {names[int(i)]: value for i, value in optimizer_state["state"].items()}
    set_optimizer_state_dict(
        policy.lm,
        optimizer,
        {"state": state, "param_groups": groups},
        options=_options(),
    )
