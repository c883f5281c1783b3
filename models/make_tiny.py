"""Build the tiny test model in ``models/tiny-llama/`` (deterministic, offline).

What it makes
-------------
* A byte-level BPE tokenizer (``tokenizers`` library) with a 512-entry vocabulary,
  trained on the first ``N_RECORDS`` records of the PandaLM test set
  (``/work/shared/data/pandalm/testset-v1.json`` or ``--data``; Apache-2.0): the
  instruction, input and both responses of each record, in file order. It is
  wrapped as a ``PreTrainedTokenizerFast`` with special tokens ``<s>`` (bos),
  ``</s>`` (eos), ``<pad>`` (pad) and the role markers ``<|system|>``,
  ``<|user|>``, ``<|assistant|>``; ``tokenizer(text)`` prepends ``<s>``. Its chat
  template renders::

      <s><|user|>\\n{content}</s><|assistant|>\\n{content}</s> ... <|assistant|>\\n

  (the last ``<|assistant|>\\n`` only with ``add_generation_prompt=True``).
* A Llama-architecture causal LM (``LlamaConfig``: hidden 64, 2 layers, 4 heads,
  2 key/value heads, MLP 128, vocabulary = the tokenizer's 512, untied embeddings)
  with random weights from ``torch.manual_seed(SEED)`` and the library's default
  initialisation, saved in float32 as ``model.safetensors``.

The weights are random: the model exists to test the plumbing (tokenisation,
log-probabilities, LoRA, caching) in seconds on a CPU, not to say anything.
The committed files are what the tests use; running this script again with the
same library versions (torch 2.13, transformers 5.23, tokenizers 0.23)
reproduces them byte for byte (``--check`` verifies that).

Usage::

    python models/make_tiny.py            # (re)writes models/tiny-llama/
    python models/make_tiny.py --check    # rebuild in a temp dir and compare
"""

from __future__ import annotations

import argparse
import filecmp
import json
import tempfile
from pathlib import Path

SEED = 20240611
N_RECORDS = 300
VOCAB_SIZE = 512
HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "tiny-llama"
DEFAULT_DATA = Path("/work/shared/data/pandalm/testset-v1.json")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MODEL_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)


def corpus(data: Path, n_records: int = N_RECORDS) -> list[str]:
    """The training texts: instruction, input, response1, response2 of the first records."""
    records = json.loads(data.read_text(encoding="utf-8"))[:n_records]
    texts: list[str] = []
    for rec in records:
        for key in ("instruction", "input", "response1", "response2"):
            value = rec.get(key)
            if isinstance(value, str) and value.strip():
                texts.append(value)
    return texts


def build_tokenizer(texts: list[str]):
    """Train the byte-level BPE tokenizer and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build(out_dir: Path, data: Path) -> None:
    """Write tokenizer + model files into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus(data))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    # Name the class by its portable alias (transformers 4.x has no TokenizersBackend).
    cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        "# tiny-llama\n\n"
        "Random-weight Llama-architecture test model (hidden 64, 2 layers, 4 heads,\n"
        f"2 kv heads, vocab {len(tokenizer)}), seed {SEED}. Made by `models/make_tiny.py`;\n"
        f"the BPE tokenizer was trained on the first {N_RECORDS} records of the PandaLM\n"
        "test set (Apache-2.0). Not a language model: for tests only.\n",
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare")
    args = parser.parse_args(argv)
    if not args.check:
        build(args.out, args.data)
        total = sum(p.stat().st_size for p in args.out.iterdir())
        print(f"wrote {args.out} ({total / 1024:.0f} KiB)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.data)
        names = sorted(p.name for p in Path(tmp).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(Path(tmp), args.out, names, shallow=False)
        if mismatch or errors:
            print(f"differs from {args.out}: {mismatch + errors}")
            return 1
    print(f"{args.out} is reproducible")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
