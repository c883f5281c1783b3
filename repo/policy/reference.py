"""Reference log-probs computed once per (model, data) and cached on disk.

DPO/IPO-style losses need :math:`\\log \\pi_{ref}(A|x)` and :math:`\\log \\pi_{ref}(B|x)`
for every pair; the reference does not train, so they are computed in one pass
and stored as a safetensors file named by a fingerprint::

    key = sha256( format version
                + model config (JSON)
                + model id (e.g. a recipe's fingerprint_id) or, without one,
                  a sha256 of every reference weight (LoRA tensors excluded)
                + compute settings (parameter dtype, autocast dtype)
                + the tokenised data (record index, prompt ids, A ids, B ids of each pair) )

A later call with the same key loads the file (a *hit*); any change to the weights,
the model id, the tokenisation (tokenizer, max_length, truncation) or the records
gives a new key (a *miss*) and a fresh computation. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from repo.policy.logps import ResponseLogps
from repo.policy.tokenize import TokenizedPair, batch_to, collate_pairs

__all__ = ["ReferenceCache", "ReferenceLogps", "data_fingerprint", "model_fingerprint"]

FORMAT_VERSION = "re-po-reference-v1"
_LORA_KEY = re.compile(r"(^|\.)lora_[^.]*(\.|$)")


def _update_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.reshape(-1).contiguous().cpu()
    h.update(flat.view(torch.uint8).numpy().tobytes())


def weight_checksum(model: nn.Module) -> str:
    """sha256 over a model's tensors (names, dtypes, shapes, bytes), LoRA tensors excluded."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if _LORA_KEY.search(name):
            continue
        _update_tensor(h, name.replace(".base_layer.", "."), tensor)
    return h.hexdigest()


def model_fingerprint(model: nn.Module, model_id: str | None = None) -> str:
    """sha256 of the model's config JSON and ``model_id`` (or, without one, its weights)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(b"|id:" + (model_id.encode() if model_id else weight_checksum(model).encode()))
    return h.hexdigest()


def data_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of the tokenised pairs, in order."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (
            (p.index,),
            p.prompt_ids,
            p.response_a_ids,
            p.response_b_ids,
        ):
            arr = np.asarray(part, dtype=np.int64)
            h.update(np.int64(arr.size).tobytes())
            h.update(arr.tobytes())
    return h.hexdigest()


@dataclass
class ReferenceLogps:
    """Reference summed log-probs (float32) and token counts of each pair, by record index."""

    index: torch.Tensor
    logp_a: torch.Tensor
    logp_b: torch.Tensor
    len_a: torch.Tensor
    len_b: torch.Tensor
    key: str = ""
    _pos: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._pos = {int(i): n for n, i in enumerate(self.index.tolist())}
        if len(self._pos) != len(self.index):
            raise ValueError("record indices of the reference log-probs are not unique")

    def __len__(self) -> int:
        return len(self.index)

    def for_batch(self, batch: Mapping[str, torch.Tensor]) -> ResponseLogps:
        """The rows for a collated batch (by its ``index``), on the batch's device."""
        try:
            rows = torch.tensor([self._pos[int(i)] for i in batch["index"].tolist()])
        except KeyError as exc:
            raise KeyError(f"record {exc.args[0]} is not in the reference cache") from None
        device = batch["input_ids"].device
        return ResponseLogps(
            *(t[rows].to(device) for t in (self.logp_a, self.logp_b, self.len_a, self.len_b))
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "index": self.index,
            "logp_a": self.logp_a,
            "logp_b": self.logp_b,
            "len_a": self.len_a,
            "len_b": self.len_b,
        }


class ReferenceCache:
    """Compute-once, on-disk cache of reference log-probs (see module docstring).

    ``hits`` and ``misses`` count calls of :meth:`get_or_compute`; ``last_hit`` tells
    whether the latest call loaded from disk.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.last_hit: bool | None = None

    def key(self, policy: Any, pairs: Sequence[TokenizedPair], model_id: str | None = None) -> str:
        """The fingerprint of (reference weights, compute settings, tokenised data)."""
        net = policy.reference_module
        recipe = getattr(policy, "recipe", None)
        if model_id is None and recipe is not None and policy.reference_model is None:
            model_id = recipe.fingerprint_id
        param = next(net.parameters())
        h = hashlib.sha256(FORMAT_VERSION.encode())
        h.update(model_fingerprint(net, model_id).encode())
        h.update(f"|dtype:{param.dtype}|autocast:{policy.autocast_dtype}|".encode())
        h.update(data_fingerprint(pairs).encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"ref-{key[:32]}.safetensors"

    def load(self, key: str) -> ReferenceLogps | None:
        """The cached entry for ``key``, or ``None``."""
        path = self.path(key)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
        tensors = load_file(str(path))
        return ReferenceLogps(**tensors, key=key)

    def get_or_compute(
        self,
        policy: Any,
        pairs: Sequence[TokenizedPair],
        *,
        batch_size: int = 8,
        model_id: str | None = None,
        progress: bool = False,
    ) -> ReferenceLogps:
        """Load the reference log-probs of ``pairs`` or compute (one pass) and store them.

        ``policy`` is a :class:`~repo.policy.policy.Policy` (its
        :meth:`~repo.policy.policy.Policy.reference_logps` is used). ``model_id``
        names the reference weights instead of checksumming them (default: the
        policy's recipe id when it has one and no separate reference model).
        ``progress`` shows a progress bar (stderr) while computing.
        """
        key = self.key(policy, pairs, model_id=model_id)
        cached = self.load(key)
        if cached is not None:
            self.hits += 1
            self.last_hit = True
            return cached
        self.misses += 1
        self.last_hit = False
        result = self.compute(policy, pairs, batch_size=batch_size, key=key, progress=progress)
        self._save(result)
        return result

    @staticmethod
    def compute(
        policy: Any,
        pairs: Sequence[TokenizedPair],
        *,
        batch_size: int = 8,
        key: str = "",
        progress: bool = False,
    ) -> ReferenceLogps:
        """Reference log-probs of ``pairs`` (no caching), ``batch_size`` pairs per forward
        (``progress``: a progress bar on stderr)."""
        if not pairs:
            raise ValueError("no pairs to compute reference log-probs for")
        tok = getattr(policy, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None) or 0  # padding is masked: any id works
        out: list[ResponseLogps] = []
        collate = getattr(policy, "collate", None) or collate_pairs  # the policy's layout
        bar = tqdm(total=len(pairs), desc="reference log-probs", unit="pair", disable=not progress)
        for start in range(0, len(pairs), batch_size):
            batch = collate(list(pairs[start : start + batch_size]), pad)
            out.append(policy.reference_logps(batch_to(batch, policy.device)))
            bar.update(len(batch["index"]))
        bar.close()
        cat = [torch.cat([getattr(o, f) for o in out]).float().cpu() for f in ResponseLogps._fields]
        index = torch.tensor([p.index for p in pairs], dtype=torch.long)
        return ReferenceLogps(index, *cat, key=key)

    def _save(self, result: ReferenceLogps) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(result.key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {k: v.contiguous() for k, v in result.tensors().items()},
                tmp,
                metadata={"format": "pt", "re_po": FORMAT_VERSION, "key": result.key},
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
