"""RE-DPO inside TRL: a small subclass of ``trl.DPOTrainer`` that adds the E-step.

For users who stay on TRL: the data set gets an ``annotator`` column, the subclass
computes DPO's logit ``s = beta * (r(chosen) - r(rejected))`` as TRL does, takes the
E-step of re-po's noise model on it (:class:`repo.train.OnlineEM`: per-label
posterior that the label is right, no gradient through it), and steps on the
gradient of the enumerated marginal likelihood (= the soft-label RE-DPO loss's
gradient). A callback runs the annotator M-step (EMA, statistics all-reduced over
processes) once per optimizer step. Everything else (data handling, reference
log-probs, precomputing them, logging, saving) is TRL's.

The symmetric flip is used because it does not care which response is "A" (TRL's
layout only has chosen/rejected). Models that read the position need the display
order: use re-po's own trainer for those.

Run (tiny model, synthetic noisy pairs)::

    pip install 're-po[bench]'        # TRL is optional; it comes with the bench extra
    python examples/trl_re_dpo.py --steps 20

Tested with TRL 1.16.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

try:
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
except ImportError as error:  # pragma: no cover - exercised when TRL is absent
    raise ImportError(
        "examples/trl_re_dpo.py needs TRL: pip install 're-po[bench]' (or pip install trl)"
    ) from error
from transformers import TrainerCallback

from repo.noise import LabelData, make_noise_model
from repo.train import OnlineEM, marginal_nll

__all__ = ["AnnotatorCollator", "REDPOTrainer"]


class AnnotatorCollator(DataCollatorForPreference):
    """TRL's preference collator, passing the ``annotator_index`` column through."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        output["annotator_index"] = torch.tensor([e["annotator_index"] for e in examples])
        return output


class _AnnotatorMStep(TrainerCallback):
    """The annotator M-step once per optimizer step (after TRL's optimizer step)."""

    def __init__(self, trainer: REDPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.online_em.m_step(self.trainer.reduce_sum)


class REDPOTrainer(DPOTrainer):
    """``DPOTrainer`` with RE-PO's E-step and annotator M-step (symmetric flip).

    :param num_annotators: ``K``; the training set needs an integer column
        ``annotator_index`` in ``0..K-1``.
    :param eta_init: initial reliability (the paper's 0.9).
    :param alpha: EMA rate of the annotator update.
    Other arguments are ``DPOTrainer``'s; ``args.loss_type`` must be the default
    ``"sigmoid"`` (DPO).
    """

    def __init__(
        self, *args: Any, num_annotators: int, eta_init: float = 0.9, alpha: float = 0.1, **kwargs
    ):
        super().__init__(*args, **kwargs)
        if list(self.loss_types) != ["sigmoid"]:
            raise ValueError(f"REDPOTrainer implements DPO (sigmoid) only, got {self.loss_types}")
        if self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
            raise ValueError("REDPOTrainer supports plain DPO (no ld_alpha, reverse KL)")
        pad = self.data_collator.pad_token_id
        self.data_collator = AnnotatorCollator(
            pad_token_id=pad,
            max_length=self.data_collator.max_length,
            truncation_mode=self.data_collator.truncation_mode,
            pad_to_multiple_of=self.data_collator.pad_to_multiple_of,
        )
        self.noise = make_noise_model("symmetric", num_annotators, eta_init=eta_init)
        self.online_em = OnlineEM(self.noise, alpha=alpha)
        self.add_callback(_AnnotatorMStep(self))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "annotator_index" not in self._signature_columns:
            self._signature_columns.append("annotator_index")

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (identity with one)."""
        if self.accelerator.num_processes == 1:
            return tensor
        out = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")
        return out.to(tensor.device)

    def _sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs of chosen and rejected, as TRL computes them."""
        keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "annotator_index"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in keys}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -(completion_mask.size(1) - 1) :].sum(dim=1)
        return logps.chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        annotator = inputs["annotator_index"]
        chosen, rejected = self._sequence_logps(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_inputs = {k: v for k, v in inputs.items() if k != "annotator_index"}
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.model, ref_inputs)
        # s = logit p(chosen truly better); label "1" = the annotator chose it
        s = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        data = LabelData.from_labels(
            annotator.cpu(), torch.ones(len(s)), num_annotators=self.noise.num_annotators
        )
        if mode == "train":
            estep = self.online_em.e_step(s, data, step=self.state.global_step)
            w = estep.w[:, 0]
        else:  # evaluation: posterior at the current annotators, no statistics kept
            w = torch.full((len(s),), float("nan"))
        loss = marginal_nll(self.noise, s, data).to(s.device, s.dtype) / len(s)
        gathered = self.accelerator.gather_for_metrics
        margins = s.detach()  # beta * (r(chosen) - r(rejected)): TRL's reward margin
        self._metrics[mode]["rewards/margins"].append(gathered(margins).mean().item())
        self._metrics[mode]["rewards/accuracies"].append(
            gathered((margins > 0).float()).mean().item()
        )
        self._metrics[mode]["w/mean"].append(float(w.mean()))
        self._metrics[mode]["eta/min"].append(float(self.noise.eta.detach().min()))
        self._metrics[mode]["eta/max"].append(float(self.noise.eta.detach().max()))
        return loss


def train_demo(steps: int, output_dir: str, eta=(0.95, 0.85, 0.6)) -> REDPOTrainer:
    """RE-DPO with TRL on the tiny model and noisy rule pairs (annotators of reliability
    ``eta``); returns the trained trainer."""
    from datasets import Dataset
    from peft import LoraConfig

    from repo.data.rule_pairs import rule_pairs
    from repo.policy import load_model_and_tokenizer

    pairs = rule_pairs(128, eta, seed=0, markers=4)
    rows = [
        {
            "prompt": r["prompt"],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "annotator_index": int(r["annotator"][1:]),
        }
        for r in pairs.rows
    ]
    model, tokenizer = load_model_and_tokenizer("tiny-llama", device="cpu")
    config = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=1e-2,
        beta=1.0,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        precompute_ref_log_probs=True,
    )
    trainer = REDPOTrainer(
        model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        num_annotators=len(eta),
    )
    trainer.train()
    return trainer


def _demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/trl-re-dpo")
    args = parser.parse_args(argv)
    trainer = train_demo(args.steps, args.output_dir)
    eta = [round(float(x), 3) for x in trainer.noise.eta.detach()]
    print(f"annotator reliabilities after {args.steps} steps: {eta}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_demo())
