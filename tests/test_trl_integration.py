"""repo.integrations.trl: RE-PO inside TRL's DPOTrainer and CPOTrainer (tiny model, CPU).

* TRL missing: the import names the extra.
* One batch: the gradient of REDPOTrainer / RECPOTrainer equals re-po's own trainer's
  (DPO, IPO, SimPO, CPO; and DPO with shared truth under the two-coin model).
* At w = 1 the per-pair losses are TRL's own, for every supported DPO loss type.
* The label columns (annotator, item, position) reach the loss through the collator.
* Four annotators of known reliability: eta moves toward the truth; every noise model runs.
* Checkpoints hold the RE-PO state; resuming gives the uninterrupted run's eta.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import tiny_config, torchrun

from repo.data.loaders import load_preferences
from repo.data.rule_pairs import rule_pairs
from repo.likelihoods import CPOLikelihood, get_likelihood
from repo.noise import NOISE_MODELS
from repo.policy import load_model_and_tokenizer
from repo.train import Trainer
from repo.train.config import ConfigError

TRUE_ETA = (0.95, 0.85, 0.7, 0.55)


def test_missing_trl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # "import trl" now raises ImportError
    monkeypatch.delitem(sys.modules, "repo.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"pip install 're-po\[trl\]'"):
        importlib.import_module("repo.integrations.trl")


@pytest.fixture
def rt():
    """The module under test (the tests below need TRL)."""
    return pytest.importorskip("repo.integrations.trl")


# ----------------------------------------------------------------------------- data


def crowd_rows(num_items: int, eta=TRUE_ETA, *, per_item: int | None = None, seed: int = 0):
    """Rule pairs labelled by ``len(eta)`` annotators of reliability ``eta``: each item by
    ``per_item`` of them (all by default), shown to all in one random display order."""
    rng = np.random.default_rng(seed)
    clean = rule_pairs(num_items, (1.0,), seed=seed, markers=4).rows
    rows = []
    for i, pair in enumerate(clean):
        who = rng.permutation(len(eta))[: per_item or len(eta)]
        first = pair["chosen"] if rng.random() < 0.5 else pair["rejected"]
        for k in sorted(who):
            right = rng.random() < eta[k]
            chosen, rejected = (
                (pair["chosen"], pair["rejected"]) if right else (pair["rejected"], pair["chosen"])
            )
            rows.append(
                {
                    "prompt": pair["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "annotator": f"a{k}",
                    "item": f"i{i}",
                    "chosen_first": chosen == first,
                }
            )
    return rows


def per_label_rows(n: int, seed: int = 0):
    rows = rule_pairs(n, TRUE_ETA, seed=seed, markers=4).rows
    return [{k: r[k] for k in ("prompt", "chosen", "rejected", "annotator")} for r in rows]


def tiny():
    return load_model_and_tokenizer("tiny-llama", device="cpu")


def dpo_config(rt, tmp_path, **fields):
    base = dict(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        beta=1.0,
        max_length=64,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    base.update(fields)
    return rt.REDPOConfig(**base)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


# ----------------------------------------------------------------------------- gradients

FAMILIES = {
    # name: (re-po [loss], TRL trainer, TRL config fields)
    "dpo-sigmoid": ({"family": "dpo", "beta": 1.0}, "dpo", {"beta": 1.0}),
    "ipo": (
        {"family": "ipo", "beta": 0.5, "length_normalized": True},
        "dpo",
        {"beta": 0.5, "loss_type": ["ipo"]},
    ),
    "simpo": (
        {"family": "simpo", "beta": 2.0, "gamma": 0.5},
        "cpo",
        {"beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 0.0},
    ),
    "cpo": ({"family": "cpo", "beta": 0.5}, "cpo", {"beta": 0.5, "cpo_alpha": 1.0}),
    "dpo-shared-two-coin": ({"family": "dpo", "beta": 1.0}, "dpo", {"beta": 1.0}),
}


def _perturb_lora(model, seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA weights (B too, so that the policy differs from the reference)."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
                values[name] = p.detach().clone()
    return values


@pytest.mark.parametrize("case", list(FAMILIES))
def test_one_batch_gradient_equals_repo_trainer(rt, tmp_path, case):
    loss_section, kind, trl_fields = FAMILIES[case]
    shared = case.endswith("two-coin")
    if shared:
        rows = crowd_rows(6, per_item=2, seed=1)
        data = {"item_column": "item", "position_column": "chosen_first", "shared_truth": True}
        noise = {"model": "two-coin", "eta_init": 0.8}
    else:
        rows = per_label_rows(12, seed=1)
        data, noise = {}, {"eta_init": 0.8}
    records = load_preferences(
        rows,
        annotator_column="annotator",
        item_column=data.get("item_column"),
        position_column=data.get("position_column"),
    )
    repo_fields = {k: v for k, v in data.items()}
    units = len({r.item for r in records}) if shared else len(records)

    # re-po's own trainer: one optimizer step over every unit; the gradient is read
    # just before the optimizer applies it
    config = tiny_config(
        tmp_path,
        max_steps=1,
        model={"layout": "concatenated", "reference": "on-the-fly", "max_length": 64},
        data=repo_fields,
        loss=loss_section,  # the family's own policy step, in both
        noise=noise,
        em={"noise_test": 0.0},  # the posterior from the first step: the step itself
        optim={"batch_size": units, "max_grad_norm": 0.0},
    )
    ours = Trainer(config, records=records)
    if case == "cpo":  # TRL's CPO averages the SFT term over tokens (per pair here)
        ours.likelihood = CPOLikelihood(beta=0.5, nll_weight=1.0, nll_length_normalized=True)
    peft_config = copy.deepcopy(ours.policy.lm.peft_config["default"])

    model, tokenizer = tiny()
    fields = dict(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=units,
        max_length=64,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast, on the CPU too
        eta_init=0.8,
        em_noise_test=0.0,
        noise_model=noise.get("model", "symmetric"),
        **{k: v for k, v in data.items()},
        **trl_fields,
    )
    if kind == "dpo":
        theirs = rt.REDPOTrainer(
            model,
            args=rt.REDPOConfig(**fields),
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        theirs = rt.RECPOTrainer(
            model,
            args=rt.RECPOConfig(**fields),
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    weights = _perturb_lora(theirs.model, seed=7)
    named = dict(ours.policy.lm.named_parameters())
    assert set(weights) == {n for n, p in named.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)

    captured = {}
    step = ours.optimizer.step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in named.items() if p.requires_grad})
        return step(*args, **kwargs)

    ours.optimizer.step = capture
    ours.train_step(0)

    theirs.model.train()
    batch = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))
    assert batch["repo_unit"].numel() == units  # the whole data in one batch
    theirs.compute_loss(theirs.model, batch).backward()
    grads = {n: p.grad for n, p in theirs.model.named_parameters() if p.requires_grad}
    assert set(grads) == set(captured)
    biggest = max(float(g.abs().max()) for g in captured.values())
    assert biggest > 1e-3  # a gradient worth comparing
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, captured[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
    # the E-step ran in both, on the same logits: the same annotator update
    theirs.online_em.m_step()
    ours_noise, theirs_noise = ours.em.noise, theirs.noise
    for name, value in ours_noise.annotator_parameters().items():
        torch.testing.assert_close(
            theirs_noise.annotator_parameters()[name], value, atol=1e-6, rtol=0
        )


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------- TRL's losses


@pytest.mark.parametrize(
    "loss_type, extra",
    [
        ("sigmoid", {}),
        ("hinge", {}),
        ("ipo", {}),
        ("exo_pair", {"label_smoothing": 1e-3}),
        ("nca_pair", {}),
        ("robust", {"label_smoothing": 0.1}),
        ("bco_pair", {}),
        ("sppo_hard", {}),
        ("apo_zero", {}),
        ("apo_down", {}),
        ("discopop", {}),
        ("sigmoid_norm", {}),
        ("sigmoid", {"f_divergence_type": "js_divergence"}),
    ],
)
def test_pair_losses_at_full_trust_are_trls(rt, loss_type, extra, trl_dpo):
    """Averaged over pairs, :func:`dpo_pair_loss` is TRL's DPO loss on the same batch."""
    trainer, batch = trl_dpo
    fields = {
        "beta": 0.5,
        "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 1.0,
        "discopop_tau": trainer.args.discopop_tau,
        "loss_type": [loss_type],
        "loss_weights": [1.0],
        **extra,
    }
    args = types.SimpleNamespace(**fields)  # a new DPOConfig would reset accelerate's state
    for name in ("beta", "label_smoothing", "f_divergence_type"):
        setattr(trainer, name, fields[name])
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, dict(batch))
        stats, _ = rt.REDPOTrainer._pair_logps(trainer, trainer.model, dict(batch))
        got = rt.dpo_pair_loss(stats, args).mean()
    assert float(expected) > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def trl_dpo(tmp_path_factory):
    """A plain TRL DPOTrainer with a perturbed adapter and one batch of its data."""
    pytest.importorskip("trl")
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = tiny()
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo")),
        per_device_train_batch_size=8,
        max_length=64,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    rows = [{**r, "prompt": r["prompt"] + "\n"} for r in per_label_rows(8)]
    trainer = DPOTrainer(
        model,
        args=args,
        train_dataset=_dataset(rows),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    _perturb_lora(trainer.model, seed=3)
    trainer.model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


# ----------------------------------------------------------------------------- columns


def test_label_columns_reach_the_loss(rt, tmp_path):
    """Annotator, item and position columns become each unit's labels in the item's A/B
    order (the display order), carried by the collator to the loss."""
    x, y, u, v = "river water answer", "planet music yellow", "paper window story", "doctor market"
    rows = [  # q1 is shown as (x, y), q2 as (v, u)
        {"prompt": "Q1:", "chosen": x, "rejected": y, "who": "ann-1", "item": "q1", "first": True},
        {"prompt": "Q1:", "chosen": y, "rejected": x, "who": "ann-2", "item": "q1", "first": False},
        {"prompt": "Q2:", "chosen": u, "rejected": v, "who": "ann-2", "item": "q2", "first": False},
        {"prompt": "Q1:", "chosen": x, "rejected": y, "who": "ann-3", "item": "q1", "first": True},
        {"prompt": "Q2:", "chosen": v, "rejected": u, "who": "ann-3", "item": "q2", "first": True},
    ]
    model, tokenizer = tiny()
    args = dpo_config(
        rt,
        tmp_path,
        annotator_column="who",
        item_column="item",
        position_column="first",
        shared_truth=True,
        per_device_train_batch_size=2,
    )
    trainer = rt.REDPOTrainer(
        model,
        args=args,
        train_dataset=_dataset(rows),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    assert trainer.args.remove_unused_columns  # TRL's default: the columns survive it
    assert trainer.repo_data.annotator_ids == ["ann-1", "ann-2", "ann-3"]
    seen = []
    loss_of = trainer._repo_loss

    def spy(stats, labels, training):
        seen.append((stats, labels))
        return loss_of(stats, labels, training)

    trainer._repo_loss = spy
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert {"repo_unit", "repo_annotator", "repo_label", "repo_mask"} <= set(batch)
    trainer.compute_loss(trainer.model, batch)
    stats, labels = seen[0]
    expected = {0: ([0, 1, 2], [1.0, 0.0, 1.0]), 1: ([1, 2], [0.0, 1.0])}  # q1, q2
    assert sorted(labels.unit.tolist()) == [0, 1] and labels.shared_truth
    first_a = {0: x, 1: v}
    for row, unit in enumerate(labels.unit.tolist()):
        annotators, outcomes = expected[unit]
        keep = labels.mask[row]
        assert labels.annotator[row][keep].tolist() == annotators
        assert labels.label[row][keep].tolist() == outcomes
        a_ids = tokenizer(first_a[unit], add_special_tokens=False)["input_ids"]
        completion = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        assert completion.tolist() == a_ids + [tokenizer.eos_token_id]  # A = shown first
    assert stats.policy_a.shape == (2,)


# ----------------------------------------------------------------------------- training


def _train(rt, tmp_path, rows, kind="dpo", eval_rows=None, **fields):
    model, tokenizer = tiny()
    eval_dataset = None if eval_rows is None else _dataset(eval_rows)
    if kind == "dpo":
        args = dpo_config(rt, tmp_path, **fields)
        trainer = rt.REDPOTrainer(
            model,
            args=args,
            train_dataset=_dataset(rows),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=lora(),
        )
    else:
        args = rt.RECPOConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            max_length=64,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            logging_steps=1,
            disable_tqdm=True,
            **fields,
        )
        trainer = rt.RECPOTrainer(
            model,
            args=args,
            train_dataset=_dataset(rows),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=lora(),
        )
    return trainer


def test_four_annotators_eta_moves_toward_the_truth(rt, tmp_path):
    rows = crowd_rows(64, TRUE_ETA, seed=2)  # every item labelled by all four
    trainer = _train(
        rt,
        tmp_path,
        rows,
        item_column="item",
        position_column="chosen_first",
        shared_truth=True,
        per_device_train_batch_size=16,
        em_alpha=0.2,
        max_steps=12,
    )
    trainer.train()
    eta = torch.tensor([trainer.annotator_parameters()["eta"][f"a{k}"] for k in range(4)])
    truth = torch.tensor(TRUE_ETA)
    start = (0.9 - truth).abs().mean()
    assert (eta - truth).abs().mean() < 0.5 * start, eta
    assert min(eta[0], eta[1]) > eta[2] > eta[3] and eta[0] - eta[3] > 0.2, eta
    logged = [h for h in trainer.state.log_history if "eta/a3" in h]
    assert len(logged) == 12 and 0 < logged[-1]["w/mean"] < 1
    # four annotators: the epoch's refit ran at its end (em_epoch_m_step 'auto')
    assert trainer.online_em.pass_refit and trainer.online_em.scale_of_refit is not None


# GLAD has a parameter per item, and training builds its noise model before it knows
# the items (a clear ConfigError: test_a_per_item_model_is_refused_in_training)
TRAINABLE = [n for n in NOISE_MODELS if n != "glad"]


def test_a_per_item_model_is_refused_in_training(rt, tmp_path):
    rows = crowd_rows(8, TRUE_ETA, per_item=3, seed=3)
    with pytest.raises(ConfigError, match="number of items"):
        _train(
            rt,
            tmp_path,
            rows,
            "dpo",
            noise_model="glad",
            item_column="item",
            position_column="chosen_first",
            shared_truth=True,
            max_steps=2,
        )


@pytest.mark.parametrize(
    "kind, noise_model", [("dpo", n) for n in TRAINABLE] + [("cpo", "symmetric")]
)
def test_every_noise_model_trains(rt, tmp_path, kind, noise_model):
    """Two optimizer steps (E-step, loss, M-step) under each noise model, shared truth;
    with the symmetric flip also TRL's evaluation (TRL's loss on held-out labels)."""
    rows = crowd_rows(8, TRUE_ETA, per_item=3, seed=3)
    fields = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0} if kind == "cpo" else {}
    if noise_model == "symmetric":  # held-out pairs need TRL's columns only
        fields.update(eval_rows=per_label_rows(4, seed=9), eval_strategy="steps", eval_steps=1)
    trainer = _train(
        rt,
        tmp_path,
        rows,
        kind,
        noise_model=noise_model,
        item_column="item",
        position_column="chosen_first",
        shared_truth=True,
        max_steps=2,  # at step 1 the policy is its reference: s = 0 tells tau nothing
        em_noise_test=0.0,  # the posterior from step 1 (the test would wait for a look)
        **fields,
    )
    before = {k: v.detach().clone() for k, v in trainer.noise.state_dict().items()}
    trainer.train()
    after = trainer.noise.state_dict()
    assert any(not torch.allclose(before[k], after[k]) for k in before)  # the M-step ran
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and np.isfinite(logged[0]["loss"]) and 0 < logged[0]["w/mean"] < 1
    if noise_model == "symmetric":
        evaluated = [h for h in trainer.state.log_history if "eval_loss" in h]
        assert evaluated and np.isfinite(evaluated[0]["eval_loss"])
        assert 0 <= evaluated[0]["eval_rewards/accuracies"] <= 1


def test_boltzmann_needs_the_nll_step(rt, tmp_path):
    with pytest.raises(ValueError, match="policy_step.*boltzmann.*nll"):
        dpo_config(rt, tmp_path, noise_model="boltzmann", policy_step="mixture")
    model, tokenizer = tiny()  # IPO's own step is the mixture: refused once it is known
    with pytest.raises(ValueError, match="policy_step.*boltzmann.*'mixture'.*nll"):
        rt.REDPOTrainer(
            model,
            args=dpo_config(rt, tmp_path, noise_model="boltzmann", loss_type=["ipo"]),
            train_dataset=_dataset(per_label_rows(8)),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    ("kind", "fields", "family"),
    [
        ("dpo", {}, "dpo"),
        ("dpo", {"loss_type": ["ipo"]}, "ipo"),
        ("cpo", {}, "cpo"),
        ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}, "simpo"),
    ],
)
def test_the_default_policy_step_is_the_familys(rt, tmp_path, kind, fields, family):
    """``policy_step="default"`` is the step ``re-po train`` takes for the same family
    (``[loss] variant = "default"``): nll for DPO, CPO and SimPO, the mixture for IPO;
    a step given is kept."""
    trainer = _train(rt, tmp_path, per_label_rows(8), kind, **fields)
    assert trainer.policy_step == get_likelihood(family).default_variant
    # and whether one annotator's eta learns from first visits (DPO and SimPO), and so
    # whether the E-step learns a scale: not DPO's, nor SimPO's with one annotator
    own = get_likelihood(family).default_out_of_sample
    assert trainer.likelihood.default_out_of_sample is own
    assert trainer.e_step_settings()["calibrate"] is (family != "dpo")  # four annotators
    if family == "simpo":
        one = [{**r, "annotator": "a"} for r in per_label_rows(8)]
        assert _train(rt, tmp_path, one, kind, **fields).e_step_settings()["calibrate"] is False
    given = "mixture" if trainer.policy_step == "nll" else "nll"
    trainer = _train(rt, tmp_path, per_label_rows(8), kind, policy_step=given, **fields)
    assert trainer.policy_step == given


def test_one_annotators_only_epoch_ends_with_the_refit_as_in_re_po_train(rt, tmp_path, monkeypatch):
    """``em_epoch_m_step="auto"`` resolves against the data's size and the epochs, as
    ``[em] epoch_m_step`` does (:func:`repo.train.build.auto_pass_refit`): RE-IPO with one
    annotator ends its only epoch with the refit; over two epochs, or as DPO (which
    refits on first visits), it does not."""
    import repo.train.build as build

    monkeypatch.setattr(build, "MIN_PASS_REFIT", 8)  # the tiny data: 8 items
    one = [{**r, "annotator": "a"} for r in per_label_rows(8)]
    ipo = _train(rt, tmp_path, one, loss_type=["ipo"], num_train_epochs=1)
    assert ipo.e_step_settings()["epoch_m_step"] is True and ipo.online_em.pass_refit
    twice = _train(rt, tmp_path, one, loss_type=["ipo"], num_train_epochs=2)
    assert twice.e_step_settings()["epoch_m_step"] is False
    dpo = _train(rt, tmp_path, one, num_train_epochs=1).e_step_settings()
    assert dpo["out_of_sample"] is True and dpo["epoch_m_step"] is False
    monkeypatch.setattr(build, "MIN_PASS_REFIT", 9)
    few = _train(rt, tmp_path, one, loss_type=["ipo"], num_train_epochs=1)
    assert few.e_step_settings()["epoch_m_step"] is False


def test_a_run_re_po_train_would_cross_fit_says_so(rt, tmp_path, monkeypatch):
    """TRL's loop trains one policy, so it has no cross-fitted scores: where ``re-po
    train``'s ``[em] cross_fit = "auto"`` would take them (one annotator, enough items,
    several epochs, or one of CPO with its SFT term or of IPO's mixture step), the
    trainer warns and reads the policy."""
    import repo.train.build as build

    monkeypatch.setattr(build, "MIN_CROSS_FIT", 8)  # the tiny data: 8 items
    one = [{**r, "annotator": "a"} for r in per_label_rows(8)]
    with pytest.warns(UserWarning, match="cross-fitted scores") as caught:
        twice = _train(rt, tmp_path, one, loss_type=["ipo"], num_train_epochs=2)
    said = [str(w.message) for w in caught if "cross-fitted scores" in str(w.message)]
    assert len(said) == 1 and "8 items, over 2 pass(es)" in said[0]
    assert twice.e_step_settings()["cross_fit"] is False
    monkeypatch.setattr(build, "MIN_PASS_REFIT", 8)
    with pytest.warns(UserWarning, match=r"8 items, over 1 pass\(es\)"):  # CPO: DPO's scorers
        cpo = _train(rt, tmp_path, one, "cpo", num_train_epochs=1)
    assert cpo.likelihood.cross_fit_scorer() == "dpo"  # its SFT term, as CPOLikelihood's
    assert cpo.e_step_settings()["epoch_m_step"] is False  # no refit of its own scores
    with pytest.warns(UserWarning, match=r"8 items, over 1 pass\(es\)"):  # IPO's mixture
        _train(rt, tmp_path, one, loss_type=["ipo"], num_train_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cross-fitted scores")
        _train(rt, tmp_path, one, num_train_epochs=1)  # DPO reads its own first visits
        monkeypatch.setattr(build, "MIN_CROSS_FIT", 9)
        _train(rt, tmp_path, one, loss_type=["ipo"], num_train_epochs=2)  # too few items


def test_unsupported_loss_type_is_named(rt, tmp_path):
    model, tokenizer = tiny()
    with pytest.raises(ValueError, match="'aot'"):
        rt.REDPOTrainer(
            model,
            args=dpo_config(rt, tmp_path, loss_type=["aot"]),
            train_dataset=_dataset(per_label_rows(8)),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(("given", "fits"), [("auto", 2), ("false", 0)])
def test_one_annotator_refits_eta_on_first_visits_after_each_epoch(
    rt, tmp_path, monkeypatch, given, fits
):
    # as in re-po train: em_out_of_sample = "auto" is on for one annotator
    from repo.inference.online import OnlineEM

    calls = []
    fit = OnlineEM.fit_out_of_sample

    def spy(self, data, reduce=None, **kwargs):
        calls.append(self.first_visit_logits(reduce).clone())
        return fit(self, data, reduce, **kwargs)

    monkeypatch.setattr(OnlineEM, "fit_out_of_sample", spy)
    rows = rule_pairs(24, [0.8], seed=3, markers=4).rows  # one annotator, a0
    trainer = _train(rt, tmp_path, rows, num_train_epochs=2, em_out_of_sample=given)
    trainer.train()
    assert trainer.online_em.out_of_sample is (given == "auto")
    assert len(calls) == fits
    if fits:  # every unit visited in the first pass; later scores are not kept
        assert not torch.isnan(calls[0]).any()
        torch.testing.assert_close(calls[0], calls[1])
    # the saved state says where eta was learned from
    trainer.save_model(str(tmp_path / "saved"))
    info = json.loads((tmp_path / "saved" / "repo_em.json").read_text())
    assert info["e_step"]["out_of_sample"] is (given == "auto")
    scale = trainer.online_em.out_of_sample_scale
    assert info.get("first_visit_scale") == (None if scale is None else pytest.approx(scale))


def test_em_policy_calibrate_takes_true_false_or_auto(rt, tmp_path):
    assert dpo_config(rt, tmp_path).repo_config().em.policy_calibrate == "auto"
    given = dpo_config(rt, tmp_path, em_policy_calibrate="false").repo_config()
    assert given.em.policy_calibrate is False
    with pytest.raises(ValueError, match="em_policy_calibrate must be 'auto', 'true' or"):
        dpo_config(rt, tmp_path, em_policy_calibrate="yes")


def test_em_out_of_sample_takes_true_false_or_auto(rt, tmp_path):
    assert dpo_config(rt, tmp_path).em_out_of_sample == "auto"
    assert dpo_config(rt, tmp_path, em_out_of_sample="true").repo_config().em.out_of_sample
    with pytest.raises(ValueError, match="em_out_of_sample must be 'auto', 'true' or 'false'"):
        dpo_config(rt, tmp_path, em_out_of_sample="yes")


def test_the_noise_test_gates_the_posterior_in_trl_too(rt, tmp_path):
    # as in re-po train: [em] noise_test = 0.05, one look over every unit of a small
    # set; clean labels leave w = 1 (the plain loss); 0 switches the test off
    assert dpo_config(rt, tmp_path).em_noise_test == 0.05
    assert dpo_config(rt, tmp_path, em_noise_test=0.0).repo_config().em.noise_test == 0.0
    with pytest.raises(ValueError, match="em_noise_test must be in"):
        dpo_config(rt, tmp_path, em_noise_test=1.0)
    rows = rule_pairs(24, [1.0], seed=3, markers=4).rows
    trainer = _train(rt, tmp_path, rows, num_train_epochs=1)
    trainer.train()
    online = trainer.online_em
    assert online.noise_test == 0.05
    assert online.noise_test_result is not None and online.noise_test_result.items == 24
    assert online.noise_evident is online.noise_test_result.rejected


# ----------------------------------------------------------------------------- resume


def test_checkpoints_hold_the_state_and_resume_gives_the_same_eta(rt, tmp_path):
    rows = per_label_rows(48, seed=4)  # per-label truth, the paper's
    fields = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    whole = _train(rt, tmp_path / "whole", rows, **fields)
    whole.train()
    checkpoint = tmp_path / "whole" / "trl" / "checkpoint-3"
    info = json.loads((checkpoint / "repo_em.json").read_text())
    assert info["annotators"] == ["a0", "a1", "a2", "a3"] and info["global_step"] == 3
    # the E-step settings the fields resolved to, as reliability.json of re-po train
    assert info["e_step"] == whole.e_step_settings()
    assert info["e_step"]["epoch_m_step"] is True and info["e_step"]["out_of_sample"] is False
    assert (checkpoint / "repo_em.safetensors").is_file()
    final = whole.annotator_parameters()["eta"]
    assert info["parameters"]["eta"] != final  # steps 4 to 6 moved it

    resumed = _train(rt, tmp_path / "resumed", rows, **fields)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    got = resumed.annotator_parameters()["eta"]
    for a in final:
        assert got[a] == pytest.approx(final[a], abs=1e-6)
    by_row = {r["row"]: r for r in whole.posteriors()}
    for r in resumed.posteriors():
        assert r["w"] == pytest.approx(by_row[r["row"]]["w"], abs=1e-5)
        assert r["step"] == by_row[r["row"]]["step"]
    saved = tmp_path / "saved"
    resumed.save_model(str(saved))  # the final folder holds the state too
    assert json.loads((saved / "repo_em.json").read_text())["parameters"]["eta"] == got


@pytest.mark.slow
def test_two_processes_hold_the_same_eta_as_one(rt, tmp_path, monkeypatch):
    """torchrun starts 2 CPU processes (gloo): the E-step statistics are all-reduced, so
    both hold the same eta, equal to one process's on the same global batches (4 per
    process x 2 = 8); the checkpoint's posterior table gathers both processes' labels."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = torchrun(root / "tests" / "_trl_dist_worker.py", tmp_path / "two", "4", timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    monkeypatch.syspath_prepend(str(root / "tests"))
    importlib.import_module("_trl_dist_worker").main(tmp_path / "one", 8)  # one process
    rank0, rank1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert rank0["eta"] == rank1["eta"]
    for a, value in single["eta"].items():
        assert rank0["eta"][a] == pytest.approx(value, abs=1e-5)
    assert rank0["eta"]["a0"] != rank0["eta"]["a3"]
    assert rank0["posteriors"] == single["posteriors"] == 3 * 8 * 4  # 3 steps, 8 items, 4 labels
    info = json.loads((tmp_path / "two" / "trl" / "checkpoint-3" / "repo_em.json").read_text())
    assert info["parameters"]["eta"] == rank0["eta"]


def test_no_prompt_prefix_warning(rt, tmp_path, caplog):
    """Rule-pair prompts end mid-word for TRL's tokenizer ("...river" + "planet ..."):
    TRL's own DPOTrainer warns that the tokenized prompt is not a prefix; REDPOTrainer
    tokenises prompt and response apart and has nothing to warn about."""
    from trl import DPOConfig, DPOTrainer

    rows = per_label_rows(8, seed=21)
    model, tokenizer = tiny()
    with caplog.at_level("WARNING"):
        DPOTrainer(
            model,
            args=DPOConfig(output_dir=str(tmp_path / "dpo"), report_to=[], use_cpu=True),
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            peft_config=lora(),
        )
    assert "not a prefix" in caplog.text
    caplog.clear()
    model, tokenizer = tiny()
    with caplog.at_level("WARNING"):
        rt.REDPOTrainer(
            model,
            args=dpo_config(rt, tmp_path),
            train_dataset=_dataset(rows),
            processing_class=tokenizer,
            peft_config=lora(),
        )
    assert "not a prefix" not in caplog.text
