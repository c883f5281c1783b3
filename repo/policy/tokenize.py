"""Tokenising preference pairs for a causal LM, and collating them into one batch.

A pair is a prompt ``x`` and two responses ``A`` and ``B`` (in the order the
annotator saw them; see DESIGN.md). Each response is scored as a continuation of
the same prompt tokens.

Rendering
---------
* Plain prompt (``str``): ``tokenizer(prompt)`` with the tokenizer's own special
  tokens (e.g. a BOS), then the response ``tokenizer(response,
  add_special_tokens=False) + [eos]``.
* Conversational prompt (a list of ``{"role", "content"}`` messages, ending with a
  non-assistant turn): the chat template with ``add_generation_prompt=True``
  (tokenised with ``add_special_tokens=False``; the template writes its own BOS),
  then the response as the assistant text ``+ [eos]``. A response may also be given
  as ``[{"role": "assistant", "content": ...}]``.

Prompt and response are tokenised separately and concatenated as ids, so the
prompt/response boundary is exact (no merge across it).

Truncation rule (``max_length`` = L, ``min_response_tokens`` = m)
-------------------------------------------------------------------
With prompt length P and response lengths R_A, R_B (eos included):

1. if ``max_prompt_length`` is set and P exceeds it, the prompt must be cut to it;
2. if P + max(R_A, R_B) > L, the prompt may keep at most
   L - max(min(R_A, m), min(R_B, m)) tokens, so that each response keeps at least
   min(R, m) tokens;
3. a prompt that must be cut (1 or 2) is handled by ``prompt_overflow``:
   ``"truncate"`` (default) keeps its *tail* (the last turns, nearest the response;
   a leading BOS token is kept as well), ``"skip"`` drops the pair (counted in
   :attr:`TokenizedPairs.skipped`), ``"error"`` raises :class:`PromptTooLongError`
   naming the record index;
4. each response then keeps its *head*: at most L - len(prompt) tokens (a cut
   response loses its eos).

A and B always share the same (possibly cut) prompt tokens, so their log-probs
condition on the same context. ``L`` must exceed ``m``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "PairTokenizer",
    "PromptTooLongError",
    "TokenizedPair",
    "TokenizedPairs",
    "collate_pairs",
    "collate_shared_prompt",
    "pack_rows",
    "PairCollator",
    "batch_to",
    "PROMPT",
    "RESPONSE_A",
    "RESPONSE_B",
    "PADDING",
]

PROMPT, RESPONSE_A, RESPONSE_B, PADDING = 0, 1, 2, -1
"""Segment codes of :func:`collate_shared_prompt`."""

Prompt = str | Sequence[Mapping[str, Any]]
Response = str | Sequence[Mapping[str, Any]]
PromptOverflow = Literal["truncate", "skip", "error"]


class PromptTooLongError(ValueError):
    """A prompt does not fit ``max_length`` and the policy is ``prompt_overflow="error"``."""

    def __init__(self, index: int, prompt_tokens: int, budget: int, max_length: int) -> None:
        self.index = index
        super().__init__(
            f"record {index}: the prompt has {prompt_tokens} tokens but at most {budget} fit "
            f"(max_length={max_length}, keeping min_response_tokens of each response); "
            "raise max_length, or use prompt_overflow='truncate' or 'skip'"
        )


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair: shared prompt, then each response (eos appended)."""

    index: int
    prompt_ids: tuple[int, ...]
    response_a_ids: tuple[int, ...]
    response_b_ids: tuple[int, ...]
    prompt_cut: int = 0
    """Prompt tokens removed by truncation."""
    response_a_cut: int = 0
    response_b_cut: int = 0

    def sequence(self, which: Literal["a", "b"]) -> tuple[list[int], int]:
        """``(input_ids, prompt_length)`` of response ``which`` after the prompt."""
        resp = self.response_a_ids if which == "a" else self.response_b_ids
        return list(self.prompt_ids) + list(resp), len(self.prompt_ids)


@dataclass
class TokenizedPairs:
    """The output of :meth:`PairTokenizer.tokenize_all`."""

    pairs: list[TokenizedPair] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    """Record indices dropped by ``prompt_overflow="skip"``."""

    @property
    def n_prompt_truncated(self) -> int:
        return sum(p.prompt_cut > 0 for p in self.pairs)

    @property
    def n_response_truncated(self) -> int:
        return sum((p.response_a_cut > 0) or (p.response_b_cut > 0) for p in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def _response_text(response: Response, index: int, name: str) -> str:
    if isinstance(response, str):
        return response
    if isinstance(response, Sequence) and len(response) == 1 and isinstance(response[0], Mapping):
        msg = response[0]
        if msg.get("role", "assistant") == "assistant" and isinstance(msg.get("content"), str):
            return msg["content"]
    raise TypeError(
        f"record {index}: {name} must be a string or one assistant message "
        f"[{{'role': 'assistant', 'content': str}}], got {type(response).__name__}"
    )


class PairTokenizer:
    """Tokenise (prompt, A, B) triples by the rule in the module docstring.

    Parameters
    ----------
    tokenizer: a Hugging Face tokenizer with an eos token (and a chat template for
        conversational prompts).
    max_length: cap on prompt + response tokens of each sequence.
    min_response_tokens: each response keeps at least ``min(len, this)`` tokens.
    max_prompt_length: optional separate cap on prompt tokens.
    prompt_overflow: ``"truncate"`` | ``"skip"`` | ``"error"`` (see module docstring).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 1024,
        *,
        min_response_tokens: int = 16,
        max_prompt_length: int | None = None,
        prompt_overflow: PromptOverflow = "truncate",
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token")
        if max_length <= min_response_tokens:
            raise ValueError(
                f"max_length ({max_length}) must exceed min_response_tokens ({min_response_tokens})"
            )
        if min_response_tokens < 1:
            raise ValueError("min_response_tokens must be at least 1")
        if prompt_overflow not in ("truncate", "skip", "error"):
            raise ValueError(
                f"prompt_overflow must be truncate|skip|error, not {prompt_overflow!r}"
            )
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.min_response_tokens = int(min_response_tokens)
        self.max_prompt_length = max_prompt_length
        self.prompt_overflow: PromptOverflow = prompt_overflow

    # -- rendering ---------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, index: int = 0) -> list[int]:
        """Token ids of a prompt (plain or conversational), before truncation."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            return list(tok(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
            if not prompt:
                raise ValueError(f"record {index}: empty conversational prompt")
            if prompt[-1].get("role") == "assistant":
                raise ValueError(
                    f"record {index}: a conversational prompt must end with a user (or "
                    "system) turn, not an assistant turn"
                )
            if getattr(tok, "chat_template", None) is None:
                raise ValueError(
                    f"record {index}: conversational prompt but the tokenizer has no chat template"
                )
            text = tok.apply_chat_template(
                [dict(m) for m in prompt], add_generation_prompt=True, tokenize=False
            )
            return list(tok(text, add_special_tokens=False)["input_ids"])
        raise TypeError(
            f"record {index}: prompt must be a string or a list of {{'role', 'content'}} "
            f"messages, got {type(prompt).__name__}"
        )

    def response_ids(self, response: Response, index: int = 0, name: str = "response") -> list[int]:
        """Token ids of a response: its text without special tokens, then eos."""
        text = _response_text(response, index, name)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [int(self.tokenizer.eos_token_id)]

    # -- truncation --------------------------------------------------------
    def _cut_prompt(self, ids: list[int], budget: int) -> list[int]:
        bos = self.tokenizer.bos_token_id
        if budget >= 2 and bos is not None and ids and ids[0] == bos:
            return [ids[0]] + ids[len(ids) - (budget - 1) :]
        return ids[len(ids) - budget :] if budget > 0 else []

    def __call__(
        self, prompt: Prompt, response_a: Response, response_b: Response, index: int = 0
    ) -> TokenizedPair | None:
        """Tokenise one pair; ``None`` when it is skipped (``prompt_overflow="skip"``)."""
        p = self.prompt_ids(prompt, index)
        a = self.response_ids(response_a, index, "response A")
        b = self.response_ids(response_b, index, "response B")
        L, m = self.max_length, self.min_response_tokens
        budget = L - max(min(len(a), m), min(len(b), m))
        if self.max_prompt_length is not None:
            budget = min(budget, self.max_prompt_length)
        prompt_cut = 0
        if len(p) > budget:  # P > L - max(min(R_A, m), min(R_B, m)) implies P + max(R) > L
            if self.prompt_overflow == "error":
                raise PromptTooLongError(index, len(p), budget, L)
            if self.prompt_overflow == "skip":
                return None
            kept = self._cut_prompt(p, budget)
            prompt_cut = len(p) - len(kept)
            p = kept
        room = L - len(p)
        return TokenizedPair(
            index=index,
            prompt_ids=tuple(p),
            response_a_ids=tuple(a[:room]),
            response_b_ids=tuple(b[:room]),
            prompt_cut=prompt_cut,
            response_a_cut=max(0, len(a) - room),
            response_b_cut=max(0, len(b) - room),
        )

    def tokenize_all(
        self,
        prompts: Iterable[Prompt],
        responses_a: Iterable[Response],
        responses_b: Iterable[Response],
        indices: Iterable[int] | None = None,
    ) -> TokenizedPairs:
        """Tokenise parallel sequences of prompts and responses.

        ``indices`` (default ``0, 1, ...``) names each record in errors, in
        :attr:`TokenizedPairs.skipped` and in the collated batch's ``index``.
        """
        out = TokenizedPairs()
        prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(
                f"prompts ({len(prompts)}), responses_a ({len(responses_a)}) and "
                f"responses_b ({len(responses_b)}) differ in length"
            )
        idx = list(indices) if indices is not None else list(range(len(prompts)))
        if len(idx) != len(prompts):
            raise ValueError("indices and prompts differ in length")
        for i, x, ra, rb in zip(idx, prompts, responses_a, responses_b, strict=True):
            pair = self(x, ra, rb, index=int(i))
            if pair is None:
                out.skipped.append(int(i))
            else:
                out.pairs.append(pair)
        return out


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad B pairs into ONE batch of 2B sequences ``[A_1..A_B, B_1..B_B]`` (right padding).

    Returns a dict of tensors:

    * ``input_ids`` (2B, T) int64: prompt + response, then ``pad_token_id``;
    * ``attention_mask`` (2B, T) int64: 1 on prompt and response tokens, 0 on padding;
    * ``response_mask`` (2B, T) int64: 1 on response tokens only (prompt and padding 0);
    * ``index`` (B,) int64: the record index of each pair.

    Right padding keeps every token's position id equal to its position in the
    unpadded sequence, so the padded forward equals the per-sequence one.
    """
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    seqs = [p.sequence("a") for p in pairs] + [p.sequence("b") for p in pairs]
    T = max(len(ids) for ids, _ in seqs)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    n = len(seqs)
    input_ids = torch.full((n, T), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((n, T), dtype=torch.long)
    response_mask = torch.zeros((n, T), dtype=torch.long)
    for row, (ids, plen) in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, plen : len(ids)] = 1
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "index": index,
    }


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the positions of ``lengths`` grouped into rows whose lengths
    sum to at most ``capacity`` (each length at most ``capacity``), longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_shared_prompt(
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
    row_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Lay out B pairs as blocks ``[prompt | A | B]``: the prompt is computed once per pair.

    Response B continues the *prompt*, not A: its tokens take positions
    ``P, P + 1, ...`` (as A's do) and may not attend to A's tokens (the attention
    mask built by :func:`repo.policy.logps.shared_prompt_mask`), and its first token
    is scored from the prompt's last position. So every log-prob equals the one of
    :func:`collate_pairs`' layout, while the prompt's tokens run through the model
    once instead of twice and each block is ``P + |A| + |B|`` tokens rather than the
    batch's longest ``P + |response|`` twice.

    Padding-free packing: the blocks are packed into rows of at most
    ``max(row_length, longest block)`` tokens (:func:`pack_rows`; default: the longest
    block, so no row is longer, and attention spans no more positions, than with one
    block a row). Each block keeps its own positions (from 0) and sees only itself (the
    mask is block-diagonal), so packing changes no log-prob; it removes the padding of
    short blocks that fit beside others. (The forward of
    :func:`~repo.policy.logps.shared_prompt_logps` drops the rows' padding altogether: it
    runs the real tokens as one row with block attention.)

    Returns a dict of tensors (R rows of T tokens, R <= B):

    * ``input_ids`` (R, T) int64, padded with ``pad_token_id`` on the right;
    * ``position_ids`` (R, T) int64 (padding: 0);
    * ``segment`` (R, T) int64: :data:`PROMPT`, :data:`RESPONSE_A`, :data:`RESPONSE_B`
      or :data:`PADDING`;
    * ``source`` (R, T) int64: the position in the row whose output scores each token
      (its predecessor in the block, the prompt's last position for the first token of
      B; -1 for a block's first token, which has no predecessor);
    * ``pair`` (R, T) int64: the pair (0..B-1) each token belongs to (padding: -1);
    * ``index`` (B,) int64: the record index of each pair.
    """
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    sizes = [len(p.prompt_ids) + len(p.response_a_ids) + len(p.response_b_ids) for p in pairs]
    rows = pack_rows(sizes, max(max(sizes), row_length or 0))
    T = max(sum(sizes[i] for i in row) for row in rows)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, T), int(pad_token_id), dtype=torch.long)
    position_ids = torch.zeros((n, T), dtype=torch.long)
    segment = torch.full((n, T), PADDING, dtype=torch.long)
    source = torch.zeros((n, T), dtype=torch.long)
    pair_of = torch.full((n, T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        o = 0  # the block's offset in the row
        for i in row:
            p = pairs[i]
            P, A, B = len(p.prompt_ids), len(p.response_a_ids), len(p.response_b_ids)
            L = P + A + B
            input_ids[r, o : o + L] = torch.tensor(
                list(p.prompt_ids) + list(p.response_a_ids) + list(p.response_b_ids),
                dtype=torch.long,
            )
            position_ids[r, o : o + P + A] = torch.arange(P + A)
            position_ids[r, o + P + A : o + L] = torch.arange(P, P + B)
            segment[r, o : o + P] = PROMPT
            segment[r, o + P : o + P + A] = RESPONSE_A
            segment[r, o + P + A : o + L] = RESPONSE_B
            source[r, o : o + L] = torch.arange(o - 1, o + L - 1)
            source[r, o] = -1
            if B:
                source[r, o + P + A] = o + P - 1 if P else -1
            pair_of[r, o : o + L] = i
            o += L
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment": segment,
        "source": source,
        "pair": pair_of,
        "index": index,
    }


class PairCollator:
    """A ``DataLoader`` ``collate_fn`` wrapping :func:`collate_pairs`."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)


def batch_to(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (non-blocking); other values pass through."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
