"""The main job (``re-po demo``): its simulation, its scores, and a whole run on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from repo.cli import main
from repo.data.hh_rlhf import load_hh_rlhf
from repo.demo import (
    DEFAULT_POOL,
    DemoSettings,
    SimulatedAnnotator,
    flag_scores,
    label_pairs,
    majority_flags,
    run_demo,
    select_pairs,
)
from repo.diagnostics.io import load_run
from repo.fit import NoiseFit
from repo.policy import PairTokenizer, load_model_and_tokenizer


@pytest.fixture(scope="module")
def measure() -> PairTokenizer:
    _, tokenizer = load_model_and_tokenizer("tiny-llama", device="cpu")
    return PairTokenizer(tokenizer, 1_000_000, min_response_tokens=1)


def test_pairs_fit_the_token_budget_and_differ_by_seed(measure):
    pairs = select_pairs(measure, 40, 128, seed=0)
    assert len(pairs) == 40
    for i, pair in enumerate(pairs):
        t = measure(pair.prompt, pair.response_a, pair.response_b, i)
        assert len(t.prompt_ids) + len(t.response_a_ids) + len(t.response_b_ids) <= 128
    other = select_pairs(measure, 40, 128, seed=1)
    assert [p.item for p in pairs] != [p.item for p in other]
    quick = DemoSettings.quick()  # the --quick run finds its pairs with the tiny tokenizer
    assert len(select_pairs(measure, quick.train_pairs + quick.test_pairs, quick.max_tokens, 0))
    with pytest.raises(ValueError, match="only .* pairs fit max_tokens=40"):
        select_pairs(measure, 500, 40, seed=0)


def test_simulated_labels_have_the_pool_reliabilities():
    """3,000 pairs x 3 labels: each annotator's share of correct labels is within four
    binomial standard errors of its eta (the spammer's of 1/2)."""
    pairs = [dataclasses.replace(p, label=i % 2) for i, p in enumerate(load_hh_rlhf()[:20])]
    pairs = (pairs * 150)[:3000]
    records, correct = label_pairs(pairs, DEFAULT_POOL, 3, seed=0)
    assert len(records) == 9000 and correct.shape == (9000,)
    annotators = np.array([r.annotator for r in records])
    for annotator in DEFAULT_POOL:
        mine = annotators == annotator.name
        p = annotator.true_eta
        se = np.sqrt(p * (1 - p) / mine.sum())
        assert abs(correct[mine].mean() - p) < 4 * se + 1e-9, annotator
    # three distinct annotators per pair, sharing the pair's item id
    for start in range(0, 30, 3):
        group = records[start : start + 3]
        assert len({r.annotator for r in group}) == 3
        assert len({r.item for r in group}) == 1
    # a label is correct exactly when it equals the pair's original label
    truth = np.repeat([p.label for p in pairs], 3)
    labels = np.array([r.label for r in records])
    np.testing.assert_array_equal(correct, labels == truth)
    with pytest.raises(ValueError, match="labels_per_pair must lie in 1..5"):
        label_pairs(pairs[:2], DEFAULT_POOL, 6, seed=0)


def test_flag_scores_and_majority_vote():
    flagged = np.array([True, True, False, False, True])
    wrong = np.array([True, False, True, False, True])
    scores = flag_scores(flagged, wrong)
    assert scores == {"flagged": 3, "wrong": 3, "precision": 2 / 3, "recall": 2 / 3}
    items = np.array(["a", "a", "a", "b", "b"])
    labels = np.array([1, 1, 0, 1, 0])
    # item a: the 0 disagrees with two 1s; item b: a tie flags nothing
    np.testing.assert_array_equal(majority_flags(items, labels), [False, False, True, False, False])


def test_demo_runs_end_to_end_and_recovers_the_pool(tmp_path, capsys):
    """The quick demo, smaller: 64 pairs x 3 labels. RE-DPO's EM ranks the adversarial
    annotator last, flags wrong labels better than chance, and the diagnostics report
    reads the run directory."""
    settings = dataclasses.replace(DemoSettings.quick(), train_pairs=64, test_pairs=32, epochs=2)
    result = run_demo(tmp_path / "demo", settings, device="cpu")
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"report: {tmp_path / 'demo' / 'report.md'}")
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    assert set(result["accuracy"]) == {"dpo", "re-dpo"}
    for values in result["accuracy"].values():
        assert 0 <= values["held_out"] <= 1
    eta = {row["annotator"]: row for row in result["eta"]}
    assert set(eta) == {a.name for a in DEFAULT_POOL}
    assert sum(row["labels"] for row in eta.values()) == 192
    estimated = {name: row["estimated_eta"] for name, row in eta.items()}
    assert min(estimated, key=estimated.get) == "adversarial", estimated
    assert estimated["adversarial"] < 0.5 < estimated["careful"], estimated
    assert result["eta_mae"] < 0.15, estimated
    rows = list(eta.values())
    for key, (a, b) in {
        "eta_mae": ("estimated_eta", "true_eta"),
        "eta_mae_realised": ("estimated_eta", "realised_eta"),
        "realised_mae": ("realised_eta", "true_eta"),
    }.items():
        assert result[key] == pytest.approx(np.mean([abs(r[a] - r[b]) for r in rows]))
    em = result["flags"]["re-dpo"]
    assert em["wrong"] == round(result["data"]["wrong_labels"] * 192)
    assert em["precision"] > 0.7 and em["recall"] > 0.5, em

    report = (tmp_path / "demo" / "report.md").read_text()
    for heading in ("Preference accuracy", "true against estimated", "flagged as flipped"):
        assert heading in report
    assert f"are themselves {result['realised_mae']:.3f} from the true eta" in report
    diagnostics = tmp_path / "demo" / "diagnostics"
    text = (diagnostics / "report.md").read_text()
    assert "training run: dpo" in text and "online EM on" in text
    for figure in ("w.png", "trajectories.png", "forest.png", "calibration.png"):
        assert (diagnostics / figure).is_file(), figure
    assert "PSIS-LOO" in text and "Posterior predictive checks" in text
    # the run directory reads as the trained noise model (no EM refit), with EM's
    # Laplace intervals at the trained parameters
    run = load_run(tmp_path / "demo" / "re-dpo")
    assert run.result["format"] == "scored" and len(run.result["labels"]) == 192
    saved = NoiseFit.load(tmp_path / "demo" / "re-dpo" / "noise")
    assert saved.annotators["eta"].tolist() == pytest.approx(
        [a["eta"] for a in run.result["annotators"]], rel=1e-12
    )
    for annotator in run.result["annotators"]:
        assert annotator["eta"] == pytest.approx(estimated[annotator["id"]], rel=1e-12)
        assert annotator["eta_lo90"] <= annotator["eta"] <= annotator["eta_hi90"]


def test_the_cli_runs_the_demo_and_a_run_directory_must_be_finished(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--quick",
            "--out",
            str(tmp_path / "cli"),
            "--train-pairs",
            "16",
            "--test-pairs",
            "8",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "cli" / "demo.json").read_text())
    assert doc["data"]["train_pairs"] == 16 and doc["settings"]["epochs"] == 1
    # a training run killed before its end has no reliability.json: diagnose says so
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "cli" / "re-dpo", broken)
    (broken / "reliability.json").unlink()
    with pytest.raises(ValueError, match="training run without reliability.json"):
        load_run(broken)
    # and one of plain DPO has no posteriors to diagnose
    with pytest.raises(ValueError, match="without posteriors.jsonl"):
        load_run(tmp_path / "cli" / "dpo")


def test_a_spammer_is_a_coin():
    spammer = SimulatedAnnotator("s", eta=0.99, spammer=True)
    assert spammer.true_eta == 0.5
