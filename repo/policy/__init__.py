"""The policy: a PyroModule around a Hugging Face causal LM (LoRA through peft).

* :class:`Policy` - ``policy(batch)`` gives summed response log-probs and token
  counts of A and B (:class:`ResponseLogps`) in one forward over the 2B sequences;
  ``policy.reference_logps(batch)`` the same under the reference (adapter disabled).
* :class:`PairTokenizer`, :func:`collate_pairs` - tokenising and padding pairs
  (batch keys ``input_ids``, ``attention_mask``, ``response_mask``, ``index``);
  :func:`collate_shared_prompt` - one block ``[prompt | A | B]`` per pair, the prompt
  computed once, blocks packed into rows without padding between them
  (``Policy.collate`` picks the layout); its forward runs the blocks' tokens as one
  padding-free row with block attention (:mod:`repo.policy.attention`).
* :func:`sequence_logps` - the masked, summed next-token log-probs.
* :class:`ReferenceCache` - reference log-probs computed once, cached on disk.
* :func:`load_recipe`, :func:`load_model_and_tokenizer`, :func:`build_random_model`
  - models from ``models/*.toml`` recipes, or random weights from a config.
* :func:`select_device`, :func:`autocast_context` - CUDA > MPS > CPU; bf16 on CUDA.
"""

from repo.policy.device import autocast_context, autocast_dtype, resolve_dtype, select_device
from repo.policy.logps import (
    ResponseLogps,
    pair_logps,
    sequence_logps,
    shared_prompt_logps,
    shared_prompt_mask,
    split_pair,
    token_logps,
)
from repo.policy.policy import LAYOUTS, Policy, default_layout
from repo.policy.recipes import (
    RANDOM_CONFIGS,
    LastLayersError,
    LoraSettings,
    ModelRecipe,
    ModelSourceError,
    build_random_model,
    find_gguf,
    list_recipes,
    load_model_and_tokenizer,
    load_recipe,
    models_dir,
    resolve_recipe,
)
from repo.policy.reference import (
    ReferenceCache,
    ReferenceLogps,
    data_fingerprint,
    model_fingerprint,
)
from repo.policy.tokenize import (
    PairCollator,
    PairTokenizer,
    PromptTooLongError,
    TokenizedPair,
    TokenizedPairs,
    batch_to,
    collate_pairs,
    collate_shared_prompt,
)

__all__ = [
    "LAYOUTS",
    "LastLayersError",
    "LoraSettings",
    "ModelRecipe",
    "ModelSourceError",
    "PairCollator",
    "ResponseLogps",
    "PairTokenizer",
    "Policy",
    "PromptTooLongError",
    "RANDOM_CONFIGS",
    "ReferenceCache",
    "ReferenceLogps",
    "TokenizedPair",
    "TokenizedPairs",
    "autocast_context",
    "autocast_dtype",
    "batch_to",
    "build_random_model",
    "collate_pairs",
    "collate_shared_prompt",
    "default_layout",
    "data_fingerprint",
    "find_gguf",
    "list_recipes",
    "load_model_and_tokenizer",
    "load_recipe",
    "model_fingerprint",
    "models_dir",
    "resolve_dtype",
    "resolve_recipe",
    "pair_logps",
    "select_device",
    "sequence_logps",
    "shared_prompt_logps",
    "shared_prompt_mask",
    "split_pair",
    "token_logps",
]
