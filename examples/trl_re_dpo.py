"""RE-DPO inside TRL: ``repo.integrations.trl.REDPOTrainer`` on noisy pairs.

For users who stay on TRL: the data set keeps TRL's columns plus an ``annotator``
column; ``REDPOConfig`` is ``DPOConfig`` with re-po's fields (noise model, EM rate,
item and position columns, shared truth); ``REDPOTrainer`` is ``DPOTrainer`` with
re-po's E-step, the posterior-weighted loss ``w L(y) + (1 - w) L(flipped)`` and the
annotator M-step once per optimizer step. Data handling, the reference, logging and
checkpoints are TRL's; the annotator state is saved in each checkpoint and restored
by ``train(resume_from_checkpoint=...)``.

Here every pair is labelled by four annotators of known reliability and the labels of
one pair share one latent truth (``item_column`` + ``shared_truth``, Dawid-Skene), so
the reliabilities are learned from the annotators' agreement as well as from the
policy; drop ``shared_truth`` (and give one label per pair) for the paper's per-label
truth. Run (tiny model, CPU)::

    pip install 're-po[trl]'          # TRL is an optional extra
    python examples/trl_re_dpo.py --steps 20

Every TRL loss type that scores one pair works (``--loss-type ipo``, ``hinge``,
``robust``, ...); ``RECPOTrainer`` is the same for TRL's CPO trainer and SimPO.
Tested with TRL 1.16.
"""

from __future__ import annotations

import argparse
import sys

from repo.integrations.trl import REDPOConfig, REDPOTrainer

TRUE_ETA = (0.95, 0.85, 0.7, 0.55)


def crowd_rows(num_pairs: int, eta=TRUE_ETA, seed: int = 0) -> list[dict]:
    """Rule pairs (:mod:`repo.data.rule_pairs`: the better response carries a marker
    word), each labelled by every annotator ``k``, who picks the better one with
    probability ``eta[k]``: TRL rows plus ``annotator`` and ``item`` columns."""
    import numpy as np

    from repo.data.rule_pairs import rule_pairs

    rng = np.random.default_rng(seed)
    rows = []
    for i, pair in enumerate(rule_pairs(num_pairs, (1.0,), seed=seed, markers=4).rows):
        for k, reliability in enumerate(eta):
            right = rng.random() < reliability
            better, worse = pair["chosen"], pair["rejected"]
            chosen, rejected = (better, worse) if right else (worse, better)
            rows.append(
                {
                    "prompt": pair["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "annotator": f"a{k}",
                    "item": f"pair-{i}",
                }
            )
    return rows


def train_demo(
    steps: int, output_dir: str, eta=TRUE_ETA, loss_type: str = "sigmoid"
) -> REDPOTrainer:
    """RE-DPO with TRL on the tiny model and :func:`crowd_rows` (annotators of
    reliability ``eta``); returns the trained trainer, its final adapter and annotator
    state saved in ``output_dir``."""
    from datasets import Dataset
    from peft import LoraConfig

    from repo.policy import load_model_and_tokenizer

    train = Dataset.from_list(crowd_rows(64, eta))
    model, tokenizer = load_model_and_tokenizer("tiny-llama", device="cpu")
    config = REDPOConfig(
        output_dir=output_dir,
        loss_type=[loss_type],
        beta=1.0,
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=1e-2,
        max_length=64,
        logging_steps=5,
        save_strategy="steps",
        save_steps=max(steps // 2, 1),
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        precompute_ref_log_probs=True,
        # RE-PO's fields: the label columns, the noise model and its EM
        annotator_column="annotator",
        item_column="item",
        shared_truth=True,
        noise_model="symmetric",
        eta_init=0.9,
        em_alpha=0.2,
    )
    trainer = REDPOTrainer(
        model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model()  # the adapter, and repo_em.json / repo_em.safetensors beside it
    return trainer


def _demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/trl-re-dpo")
    parser.add_argument("--loss-type", default="sigmoid", help="TRL's DPO loss type")
    args = parser.parse_args(argv)
    trainer = train_demo(args.steps, args.output_dir, loss_type=args.loss_type)
    learned = trainer.annotator_parameters()["eta"]
    print(f"annotator reliabilities after {args.steps} steps (true, learned):")
    for (annotator, value), truth in zip(learned.items(), TRUE_ETA, strict=True):
        print(f"  {annotator}: {truth:.2f}  {value:.3f}")
    flipped = sum(row["flipped"] for row in trainer.posteriors())
    print(f"labels believed flipped at their latest E-step: {flipped}")
    print(f"adapter and annotator state: {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from repo.train.launch import exit_process

    exit_process(_demo())  # under torchrun: without the finalization that can abort
