"""One annotator, as a user meets it: ``re-po train`` with LoRA on the tiny model.

A rule task of its own (:mod:`repo.data.rule_pairs`, 4 marker words, 8,192 pairs, one
annotator whose labels are flipped at rate rho, no annotator column), trained by the
command line with its defaults and ``[em] enabled = true``, except a LoRA learning
rate of 2e-3 (at the default 1e-4 the tiny model's adapter learns nothing of the rule
in one pass, and no estimator can then tell eta). It records the learned eta against
the realised share of correct labels, the profile-likelihood interval of eta from
``reliability.json``, and the held-out accuracy from ``re-po eval`` on 500 clean pairs,
beside that of DPO trained the same way (``[em] enabled = false``) on the same pairs.
``--family ipo`` (or ``simpo``, ``cpo``) runs RE-X against X instead; ``--epochs N``
makes N passes (one by default, ``re-po train``'s own default). Over several passes at
4,096 pairs or more RE-DPO's, RE-IPO's and RE-CPO's E-step reads cross-fitted scores by
default, and RE-CPO's and RE-IPO's in one pass too (``[em] cross_fit = "auto"``,
docs/math.md section 13, :func:`repo.train.build.auto_cross_fit`; a row that did says
``"cross_fit": true`` and its folds, ``"cross_fit_folds"`` (``--cross-fit-folds`` asks
for a count: ``"cross_fit_folds_option"``), and names its scorers' loss, ``"cross_fit_scorer"``,
where it is not the family's: DPO for CPO, IPO for DPO over several passes, and how
far the scores tell the truths, ``"scorer_accuracy"`` and ``"scorer_agreement"``,
:func:`scorer_strength`);
``--cross-fit true`` or ``false`` asks for one or the other (a row of its own,
``"cross_fit_option"``), ``--cross-fit-scorer`` the scorers' loss
(``"cross_fit_scorer_option"``). Where one pass of RE-IPO over 4,096 pairs or more reads the
policy (``--cross-fit false``), its annotator parameters are refitted on the pass's
scores at its end by default (``[em] epoch_m_step = "auto"``,
:func:`repo.train.build.auto_pass_refit`; a row whose run did says ``"epoch_m_step":
true``); ``--epoch-m-step true`` or ``false`` asks for it or not
(``"epoch_m_step_option"``). A row whose run took the noise test records its last look's
p-value, level and outcome (``"noise_test_p"``; ``"noise_test_level"``: the level of
that look, the test's divided by the number of looks; ``"noise_evident"``: whether the posterior
reached the policy, else RE-X trained as X on the labels as given).

    python examples/one_annotator_lora.py --out docs/experiments        # 6 pairs of runs
    python examples/one_annotator_lora.py --flip-rates 0.2 --out docs/experiments   # 3 more
    python examples/one_annotator_lora.py --pairs 512 --seeds 1 --flip-rates 0.3 --out /tmp/x
    python examples/one_annotator_lora.py --family ipo --flip-rates 0.4 --out docs/experiments
    python examples/one_annotator_lora.py --family cpo --epochs 4 --flip-rates 0.2 0.4 \
        --out docs/experiments
    python examples/one_annotator_lora.py --family ipo --epochs 4 --flip-rates 0.4 \
        --trace 128 --out docs/experiments      # with each run's trajectory
    python examples/one_annotator_lora.py --family ipo --epochs 4 --flip-rates 0.4 \
        --variant weighted --out docs/experiments   # RE-IPO's "weighted" policy step
    python examples/one_annotator_lora.py --pairs 1024 --epochs 4 --flip-rates 0.2 0.4 \
        --cross-fit true --out /tmp/x               # [em] cross_fit asked for
    python examples/one_annotator_lora.py --family ipo --pairs 4096 --flip-rates 0.2 0.4 \
        --epoch-m-step false --out /tmp/x           # no refit ending the one pass
    python examples/one_annotator_lora.py --markers 8 --epochs 4 --flip-rates 0.4 \
        --seeds 101 102 103 --out /tmp/x            # another rule task: 8 marker words
    python examples/one_annotator_lora.py --family ipo --cross-fit-folds 2 \
        --flip-rates 0.4 --out /tmp/x               # scorers on half the pairs each

Writes ``one-annotator-lora.json`` (a row per family, pairs, epochs, flip rate and seed;
a row without ``family`` is DPO's, one without ``epochs`` one pass's): the rows
already there are kept and their runs not repeated (a row without DPO's accuracy,
``plain_accuracy``, gets that run alone; with ``--trace``, a row without trajectories
gets both runs again). X's run does not depend on RE-X's policy step or ``[em]``
fields, so a new row takes X's figures from a row of the same family, task, pairs,
passes, flip rate and seed that has them, and runs RE-X alone. The last line printed
is the file's JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from repo.data.rule_pairs import RulePairs, rule_pairs, true_preferences
from repo.experiments import scorer_accuracy
from repo.train.config import EMSection
from repo.train.run_dir import RunDir

CONFIG = """[model]
recipe = "tiny-llama"
device = "cpu"
[data]
train = "train.jsonl"
eval = "{eval}"
[loss]
family = "{family}"
variant = "{variant}"
[em]
enabled = {em}
cross_fit = {cross_fit}
cross_fit_folds = {cross_fit_folds}
cross_fit_scorer = {cross_fit_scorer}
epoch_m_step = {epoch_m_step}
[optim]
learning_rate = 2e-3
epochs = {epochs}
[run]
output_dir = "{output}"
progress = false
eval_steps = {every}
seed = {seed}
"""
"""The run's config: the defaults, the loss family (and RE-X's policy step, ``[loss]
variant``), LoRA's learning rate, the passes, ``[em] enabled`` (RE-X) or not (X,
the paired baseline), and the ``[em]`` fields of :data:`ASKED` (``"auto"`` unless
``--cross-fit``, ``--epoch-m-step`` and ``--cross-fit-folds`` say).
With ``--trace`` the held-out pairs are also scored every ``every`` optimizer steps (``eval`` and
``eval_steps``: ``eval/accuracy`` in ``metrics.jsonl``); without, both keep their
defaults (``""`` and 0: no evaluation during training)."""


def folds_option(text: str) -> str:
    """``--cross-fit-folds``'s value as given: ``"auto"`` or a count of at least 2
    (what ``[em] cross_fit_folds`` takes); anything else is refused when parsed."""
    if text != "auto" and not (text.isdigit() and int(text) >= 2):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a count of at least 2, got {text!r}")
    return text if text == "auto" else str(int(text))


ASKED = {
    "cross_fit": ("auto", "true", "false"),
    "epoch_m_step": ("auto", "true", "false"),
    "cross_fit_folds": folds_option,
    "cross_fit_scorer": ("auto", "dpo", "ipo", "simpo", "cpo"),
}
"""RE-X's ``[em]`` fields a run may ask for, each with the values its option takes
(``--cross-fit``, ``--epoch-m-step``: ``"auto"``, ``"true"`` or ``"false"``;
``--cross-fit-folds``: what :func:`folds_option` passes, ``"auto"`` or a count;
``--cross-fit-scorer``: ``"auto"`` or the loss family the scorers train with); ``"auto"``
leaves the field at its default (:func:`toml_value`), and another value is kept in the
row as ``<field>_option`` and makes a row of its own (:func:`_key`)."""


def toml_value(name: str, value: str) -> str:
    """``[em] name``'s value as TOML: ``"auto"`` is the field's default
    (:class:`~repo.train.config.EMSection`), a boolean or a count is written bare, a
    name quoted."""
    if value == "auto":
        return json.dumps(EM_DEFAULTS[name])
    return value if value in ("true", "false") or value.isdigit() else json.dumps(value)


EM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EMSection)}
"""``[em]``'s fields and their defaults."""

TRACED = (
    "noise/evident",
    "posterior/on",
    "eta/mean",
    "e_step_scale",
    "w/frac_below_0.5",
    "rewards/accuracies",
)
"""The E-step's metrics a trace averages over the steps since the last evaluation."""


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")


def _train_and_eval(
    folder: Path,
    em: bool,
    seed: int,
    family: str,
    epochs: int = 1,
    trace: int = 0,
    variant: str = "default",
    asked: dict[str, str] | None = None,
) -> tuple[Path, float]:
    """``re-po train`` then ``re-po eval`` on the held-out pairs: the run's folder and its
    held-out accuracy. ``trace > 0`` also scores the held-out pairs every ``trace``
    steps during training; ``variant`` is ``[loss] variant``, ``asked`` the ``[em]``
    fields of :data:`ASKED` given a value (the others ``"auto"``; :data:`CONFIG`)."""
    asked = {name: "auto" for name in ASKED} | (asked or {})
    output = "run" if em else "run-plain"
    config = folder / f"{output}.toml"
    text = CONFIG.format(
        em=str(em).lower(),
        output=output,
        seed=seed,
        family=family,
        variant=variant,
        epochs=epochs,
        eval="held.jsonl" if trace else "",
        every=trace,
        **{name: toml_value(name, value) for name, value in asked.items()},
    )
    config.write_text(text)
    cli = [sys.executable, "-m", "repo.cli"]
    subprocess.run([*cli, "train", config.name], cwd=folder, check=True, capture_output=True)
    scores = subprocess.run(
        [*cli, "eval", output, "--data", "held.jsonl"],
        cwd=folder, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return folder / output, json.loads(scores.stdout.strip().splitlines()[-1])["accuracy"]


def trace_of(run: Path) -> list[dict]:
    """The run's trajectory from ``metrics.jsonl``: at each evaluation, the step, the
    pass (``epoch``), the held-out accuracy, and the means of :data:`TRACED` over the
    steps since the evaluation before (those a run logged)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open(encoding="utf-8")]
    points, since = [], []
    for r in rows:
        since.append(r)
        if "eval/accuracy" not in r:
            continue
        point = {"step": r["step"], "epoch": round(r["epoch"], 3), "accuracy": r["eval/accuracy"]}
        for key in TRACED:
            values = [x[key] for x in since if key in x]
            if values:
                point[key] = round(sum(values) / len(values), 4)
        points.append(point)
        since = []
    return points


def run_one(
    pairs: int,
    rho: float,
    seed: int,
    row: dict | None = None,
    family: str = "dpo",
    epochs: int = 1,
    trace: int = 0,
    variant: str = "default",
    asked: dict[str, str] | None = None,
    markers: int = 4,
) -> dict:
    """RE-X (``[em] enabled = true``) and X on the same pairs, each by ``re-po train``
    then ``re-po eval``, in a temporary folder; one row. Given ``row`` (an earlier run's),
    only what it lacks is run. ``trace > 0`` runs both and records their trajectories
    (:func:`trace_of`, every ``trace`` steps) as ``trace`` and ``plain_trace``.
    ``variant``: RE-X's ``[loss] variant`` (X's run is the same whatever it is), kept
    in the row when not ``"default"``; ``asked``: RE-X's ``[em]`` fields of :data:`ASKED`
    given a value, each kept as ``<field>_option`` when not ``"auto"``; ``markers``: the
    rule task's marker words a side (:func:`~repo.data.rule_pairs.rule_pairs`), kept in
    the row when not 4. A cross-fitted run's row records the folds it split the items
    in (``"cross_fit_folds"``)."""
    data = rule_pairs(pairs, [1 - rho], seed=seed, markers=markers)
    held = rule_pairs(500, [1.0], seed=10_000 + seed, markers=markers)
    row = dict(row or {})
    with tempfile.TemporaryDirectory(prefix="re-po-lora-") as tmp:
        folder = Path(tmp)
        _write(folder / "train.jsonl", data.rows)
        _write(folder / "held.jsonl", held.rows)
        if "eta" not in row or (trace and "trace" not in row):
            run, accuracy = _train_and_eval(
                folder, True, seed, family, epochs, trace, variant, asked
            )
            if trace:
                row["trace"] = trace_of(run)
            report = json.loads((run / "reliability.json").read_text())
            if family != "dpo":
                row["family"] = family
            if variant != "default":
                row["variant"] = variant
            if markers != 4:
                row["markers"] = markers
            for name, value in (asked or {}).items():
                if value != "auto":
                    row[f"{name}_option"] = value
            if epochs != 1:
                row["epochs"] = epochs
                row["held_out_items"] = report.get("held_out_items", 0)
            e_step = report.get("e_step") or {}
            if e_step.get("cross_fit"):  # the E-step read the folds' scores
                row["cross_fit"] = True
                row["cross_fit_folds"] = e_step["cross_fit_folds"]
                row.update(scorer_strength(run, data))
                if e_step.get("cross_fit_scorer", family) != family:  # scorers of another loss
                    row["cross_fit_scorer"] = e_step["cross_fit_scorer"]
            if e_step.get("epoch_m_step"):  # the annotator refit ended each pass
                row["epoch_m_step"] = True
            test = report.get("noise_test")  # its last look: whether the posterior was on
            if test is not None:
                row["noise_test_p"] = round(test["p_value"], 4)
                row["noise_test_level"] = round(test["level"], 6)  # the look's: Bonferroni
                row["noise_evident"] = test["rejected"]
            row.update(
                pairs=pairs,
                flip_rate=rho,
                seed=seed,
                eta_true=round(float(data.realised_eta[0]), 4),
                eta=round(report["annotators"][0]["eta"], 4),
                profile_interval=[round(v, 4) for v in report["eta_profile"]["interval"]],
                held_out_accuracy=accuracy,
            )
        if "plain_accuracy" not in row or (trace and "plain_trace" not in row):
            run, row["plain_accuracy"] = _train_and_eval(folder, False, seed, family, epochs, trace)
            if trace:
                row["plain_trace"] = trace_of(run)
    return row


def cross_fitted_scores(run: Path, rows: list[dict]) -> tuple[torch.Tensor, ...]:
    """``(c, labels, truths)`` of a finished cross-fitted run ``run`` on the pairs
    ``rows`` (one label each): each pair's cross-fitted score (in units of their rms),
    its label (1: A preferred) and whether A is truly the better
    (:func:`~repo.data.rule_pairs.true_preferences`), ``(n,)`` each in the pairs' order."""
    run_dir = RunDir(run)
    c = load_file(str(run_dir.noise_file))["cross_fit.logits"].to(torch.float64)  # by item
    posteriors = run_dir.read_posteriors()  # a label a pair, in the pairs' order
    if [p["row"] for p in posteriors] != list(range(len(rows))) or len(c) != len(rows):
        raise ValueError(f"{run}: expected one label a pair, in the order of the pairs")
    labels = torch.tensor([float(p["label"]) for p in posteriors], dtype=torch.float64)
    return c, labels, torch.from_numpy(true_preferences(rows, labels.tolist()))


def scorer_strength(run: Path, data: RulePairs) -> dict:
    """How far the cross-fitted scores of a finished run ``run`` (on ``data``'s pairs,
    one label each) tell the truths: ``scorer_accuracy``, the share of the pairs whose
    score's sign is the true preference, and ``scorer_agreement``, the share whose
    score's sign is the label (what a fit can see: under the symmetric flip it is
    ``(1 - eta) + (2 eta - 1) * scorer_accuracy``)."""
    c, labels, truth = cross_fitted_scores(run, data.rows)
    return {
        "scorer_accuracy": scorer_accuracy(c, truth.numpy()),
        "scorer_agreement": scorer_accuracy(c, labels.numpy()),
    }


def _key(row: dict) -> tuple:
    """A row's place: family (DPO's rows name none), policy step (``"default"`` where a
    row names none), the ``[em]`` fields of :data:`ASKED` asked for (``"auto"`` where a
    row names none), marker words (4 where a row names none), pairs, passes (one where a
    row names none), flip rate, seed."""
    family, *task = _task_key(row)
    asked = (row.get(f"{name}_option", "auto") for name in ASKED)
    return (family, row.get("variant", "default"), *asked, *task)


def _task_key(row: dict) -> tuple:
    """What X's run (``[em] enabled = false``) depends on: the row's place (:func:`_key`)
    less RE-X's policy step and ``[em]`` fields, which X's run does not read."""
    return (
        row.get("family", "dpo"),
        row.get("markers", 4),
        row["pairs"],
        row.get("epochs", 1),
        row["flip_rate"],
        row["seed"],
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=8192)
    parser.add_argument(
        "--markers",
        type=int,
        default=4,
        help="marker words a side of the rule task (rows of another count than 4 are rows "
        "of their own)",
    )
    parser.add_argument("--flip-rates", type=float, nargs="+", default=[0.3, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--family", default="dpo", choices=["dpo", "ipo", "simpo", "cpo"])
    parser.add_argument("--epochs", type=int, default=1, help="passes over the pairs")
    parser.add_argument(
        "--variant",
        default="default",
        choices=["default", "nll", "mixture", "weighted"],
        help="RE-X's policy step ([loss] variant); rows of a step other than the "
        "family's default are rows of their own",
    )
    for name, values in ASKED.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default="auto",
            **({"type": values} if callable(values) else {"choices": values}),
            help=f"RE-X's [em] {name}; rows of a value other than 'auto' are rows of their own",
        )
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="STEPS",
        help="score the held-out pairs every STEPS steps during both runs and keep the "
        "trajectories (accuracy and the E-step's metrics) in the rows; runs rows without one",
    )
    args = parser.parse_args(argv)
    path = args.out / "one-annotator-lora.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {_key(r): r for r in rows}
    plain = {_task_key(r): r for r in rows if "plain_accuracy" in r}
    args.out.mkdir(parents=True, exist_ok=True)
    asked = {name: getattr(args, name) for name in ASKED}
    for rho in args.flip_rates:
        for seed in args.seeds:
            place = {
                "family": args.family,
                "variant": args.variant,
                **{f"{name}_option": value for name, value in asked.items()},
                "markers": args.markers,
                "pairs": args.pairs,
                "epochs": args.epochs,
                "flip_rate": rho,
                "seed": seed,
            }
            old = done.get(_key(place))
            complete = old is not None and "eta" in old and "plain_accuracy" in old
            if complete and (not args.trace or "trace" in old):
                continue
            start = dict(old or {})
            twin = plain.get(_task_key(place))  # X's run, made for a row of another step
            if "plain_accuracy" not in start and twin is not None:
                start.update({k: twin[k] for k in ("plain_accuracy", "plain_trace") if k in twin})
            new = run_one(
                args.pairs,
                rho,
                seed,
                start,
                family=args.family,
                epochs=args.epochs,
                trace=args.trace,
                variant=args.variant,
                asked=asked,
                markers=args.markers,
            )
            rows = [r for r in rows if r is not old] + [new]
            plain.setdefault(_task_key(new), new)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            rows.sort(key=_key)
            path.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
