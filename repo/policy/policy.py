r"""The policy: a PyroModule around a Hugging Face causal LM (LoRA through peft).

``Policy(batch)`` computes, in one forward over the collated 2B sequences,
the summed response log-probs :math:`\log \pi_\theta(A \mid x)`,
:math:`\log \pi_\theta(B \mid x)` and the response token counts (see
:mod:`repo.policy.logps`). :meth:`Policy.reference_logps` gives the same for the
reference :math:`\pi_{\mathrm{ref}}`: the same network with the LoRA adapter
disabled (no second copy of the weights), or a separate frozen model.

Which log-probs a loss uses is the loss's business (:mod:`repo.likelihoods`):
DPO, IPO and CPO use the sums, SimPO the means ``ResponseLogps.mean_a``/``mean_b``;
SimPO and CPO need no reference.

The Hugging Face model is an ordinary ``nn.Module`` held as the submodule
``model``; it is deliberately *not* registered in Pyro's global parameter store
(the policy is stepped by a torch optimizer over :meth:`trainable_parameters`, and
the store would alias same-named weights of different instances). Internally the
network is always reached through :attr:`Policy.lm`, which bypasses
``PyroModule.__getattr__``'s ``pyro.module`` statement.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pyro.nn import PyroModule

from repo.policy.device import autocast_context, autocast_dtype
from repo.policy.logps import ResponseLogps, pair_logps, split_pair
from repo.policy.recipes import LoraSettings, ModelRecipe, load_model_and_tokenizer
from repo.policy.tokenize import TokenizedPair, collate_pairs, collate_shared_prompt

__all__ = ["LAYOUTS", "Policy", "default_layout"]

LAYOUTS = ("shared-prompt", "concatenated")
"""Batch layouts: ``[prompt | A | B]`` rows (the prompt computed once) or the 2B
sequences ``[prompt | A]``, ``[prompt | B]`` (see :mod:`repo.policy.tokenize`)."""


def default_layout(model: nn.Module) -> str:
    """``"shared-prompt"`` where the attention takes a custom 4-D mask (``sdpa``, ``eager``)
    and no sliding window applies (a custom mask would bypass it), else ``"concatenated"``."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return "concatenated"
    if getattr(config, "sliding_window", None) or getattr(config, "layer_types", None):
        return "concatenated"
    return "shared-prompt"


_LORA_KEY = re.compile(r"(^|\.)lora_[^.]*(\.|$)")


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _is_quantized(model: nn.Module) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


class Policy(PyroModule):
    """A causal-LM policy for preference optimisation.

    Parameters
    ----------
    model: a ``transformers`` causal LM (or an existing ``peft.PeftModel``).
    tokenizer: its tokenizer (kept for saving and for padding ids), optional.
    lora: LoRA settings (:class:`~repo.policy.recipes.LoraSettings`, a mapping of
        them, or a ``peft.LoraConfig``): the model is wrapped with
        ``peft.get_peft_model`` and only the adapter trains. ``None``: full
        fine-tuning (every parameter trains), unless ``model`` is already a
        ``PeftModel``.
    reference_model: a separate frozen reference network. Needed for full
        fine-tuning when reference log-probs are wanted; with LoRA the default
        reference is the same network with the adapter disabled.
    gradient_checkpointing: default on for CUDA, off elsewhere.
    autocast: bf16 autocast of the forward; default on for CUDA, off elsewhere.
    chunk_size: rows per float32 log-softmax chunk (:func:`~repo.policy.logps.token_logps`).
    layout: how :meth:`collate` lays out pairs: ``"shared-prompt"`` (one row
        ``[prompt | A | B]`` per pair, the prompt computed once), ``"concatenated"``
        (2B rows) or ``"auto"`` (:func:`default_layout`). :meth:`forward` reads either.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        *,
        lora: LoraSettings | Mapping[str, Any] | Any | None = None,
        reference_model: nn.Module | None = None,
        gradient_checkpointing: bool | None = None,
        autocast: bool | None = None,
        chunk_size: int = 4096,
        layout: str = "auto",
    ) -> None:
        super().__init__()
        if layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
        device = next(model.parameters()).device
        quantized = _is_quantized(model)
        if gradient_checkpointing is None:
            gradient_checkpointing = device.type == "cuda"
        if lora is not None:
            if _is_peft(model):
                raise ValueError("model is already a PeftModel; pass lora=None")
            from peft import get_peft_model, prepare_model_for_kbit_training

            if isinstance(lora, Mapping):
                lora = LoraSettings.from_mapping(lora)
            peft_config = (
                lora.to_peft(getattr(model.config, "num_hidden_layers", None))
                if isinstance(lora, LoraSettings)
                else lora
            )
            if quantized:
                model = prepare_model_for_kbit_training(
                    model,
                    use_gradient_checkpointing=gradient_checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                )
            model = get_peft_model(model, peft_config)
        elif not _is_peft(model):
            if quantized:
                raise ValueError("a quantized (4/8-bit) model can only be trained with LoRA")
            for p in model.parameters():
                p.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            if getattr(model, "config", None) is not None:
                model.config.use_cache = False
        self.model = model
        self.tokenizer = tokenizer
        if reference_model is not None:
            reference_model.eval()
            for p in reference_model.parameters():
                p.requires_grad_(False)
        # a tuple, so the frozen reference is not a submodule (not in parameters()/state_dict)
        self._reference: tuple[nn.Module, ...] = (
            (reference_model,) if reference_model is not None else ()
        )
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.autocast = autocast
        self.chunk_size = int(chunk_size)
        self.layout = default_layout(model) if layout == "auto" else layout
        self.recipe: ModelRecipe | None = None

    # -- construction -----------------------------------------------------
    @classmethod
    def from_recipe(
        cls,
        recipe: ModelRecipe | str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        use_lora: bool = True,
        quantization: str | None = None,
        lora: LoraSettings | None = None,
        **kwargs: Any,
    ) -> Policy:
        """Load a recipe's model and tokenizer and wrap them (with the recipe's LoRA, or
        ``lora`` when given)."""
        from repo.policy.recipes import resolve_recipe

        recipe = resolve_recipe(recipe)
        model, tokenizer = load_model_and_tokenizer(
            recipe, device=device, dtype=dtype, quantization=quantization
        )
        lora = (lora or recipe.lora) if use_lora else None
        policy = cls(model, tokenizer, lora=lora, **kwargs)
        policy.recipe = recipe
        return policy

    # -- accessors ----------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        """The wrapped network (``PeftModel`` with LoRA), without a ``pyro.module`` statement."""
        return self._modules["model"]

    @property
    def reference_model(self) -> nn.Module | None:
        """The separate frozen reference network, if one was given."""
        return self._reference[0] if self._reference else None

    @property
    def reference_module(self) -> nn.Module:
        """The network whose (non-adapter) weights define the reference policy."""
        return self._reference[0] if self._reference else self.lm

    @property
    def has_adapter(self) -> bool:
        return _is_peft(self.lm)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the forward autocasts to, or ``None`` (no autocast)."""
        if self.autocast is False:
            return None
        return autocast_dtype(self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: the LoRA adapter's, or all of them (full fine-tuning)."""
        return [p for p in self.lm.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.lm.named_parameters() if p.requires_grad)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -- log-probs ----------------------------------------------------------
    def _autocast(self):
        return autocast_context(self.device, enabled=self.autocast_dtype is not None)

    def collate(
        self, pairs: list[TokenizedPair], pad_token_id: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Collate tokenised pairs in this policy's :attr:`layout` (on the CPU)."""
        if pad_token_id is None:
            pad_token_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        if self.layout == "shared-prompt":
            return collate_shared_prompt(pairs, pad_token_id)
        return collate_pairs(pairs, pad_token_id)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> ResponseLogps:
        """Summed log-probs and token counts of A and B under the policy (with grad).

        ``batch`` is a collated pair batch already on :attr:`device`, in either layout:
        :func:`~repo.policy.tokenize.collate_pairs` (2B rows, A first) or
        :func:`~repo.policy.tokenize.collate_shared_prompt` (B rows ``[prompt | A | B]``).
        """
        with self._autocast():
            sums, lengths = pair_logps(self.lm, batch, chunk_size=self.chunk_size)
        return split_pair(sums, lengths)

    @torch.no_grad()
    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> ResponseLogps:
        """Summed log-probs and token counts under the reference, without grad.

        The reference is the separate frozen model when one was given, else the
        same network with the LoRA adapter disabled (``disable_adapter()``). Both
        run in eval mode (no dropout).
        """
        if self._reference:
            net, ctx = self._reference[0], contextlib.nullcontext()
        elif self.has_adapter:
            net, ctx = self.lm, self.lm.disable_adapter()
        else:
            raise RuntimeError(
                "no reference: full fine-tuning needs reference_model=... (a frozen copy) "
                "or precomputed reference log-probs (ReferenceCache)"
            )
        was_training = net.training
        net.eval()
        try:
            with ctx, self._autocast():
                sums, lengths = pair_logps(net, batch, chunk_size=self.chunk_size)
        finally:
            net.train(was_training)
        return split_pair(sums, lengths)

    # -- saving -------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike[str]) -> Path:
        """Write the LoRA adapter (peft format, + tokenizer) to ``directory``."""
        if not self.has_adapter:
            raise RuntimeError("no LoRA adapter to save (full fine-tuning): use merge_and_save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        r"""State dict of the plain model with the adapter folded in: ``W + (alpha/r) B A``.

        The live model is not changed (no merge/unmerge round-off).
        """
        if not self.has_adapter:
            return dict(self.lm.state_dict())
        from peft.tuners.lora import LoraLayer

        if _is_quantized(self.lm):
            raise NotImplementedError(
                "merging into a 4-bit model is not supported: save_adapter(), then load the "
                "base model in bf16 and merge there"
            )
        base = self.lm.get_base_model()
        adapter = self.lm.active_adapter
        deltas: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    if module.merged:
                        raise RuntimeError(f"{name}: adapter is merged in place; unmerge first")
                    deltas[name] = module.get_delta_weight(adapter)
            out: dict[str, torch.Tensor] = {}
            for key, value in base.state_dict().items():
                if _LORA_KEY.search(key):
                    continue
                out[key.replace(".base_layer.", ".")] = value
            for name, delta in deltas.items():
                key = f"{name}.weight"
                weight = out[key]
                out[key] = weight + delta.to(device=weight.device, dtype=weight.dtype)
        return out

    def merge_and_save(self, directory: str | os.PathLike[str]) -> Path:
        """Save a plain ``transformers`` model (adapter merged) + tokenizer to ``directory``.

        Reload it with ``AutoModelForCausalLM.from_pretrained(directory)``; no peft needed.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = self.lm.get_base_model() if self.has_adapter else self.lm
        state = {k: v.detach().contiguous() for k, v in self.merged_state_dict().items()}
        base.save_pretrained(directory, state_dict=state)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory
