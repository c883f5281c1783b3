"""``re-po diagnose`` over several fits: one report comparing them, and its figures."""

import json

import numpy as np
import pandas as pd
import pytest
from test_fit_warnings import boundary_labels  # the crowd with annotators on the boundary

from repo.cli import main
from repo.data.simulate import simulate_labels
from repo.diagnostics import diagnose, load_run, plots
from repo.diagnostics.checks import run_warnings

K = 7  # more annotators than a trace-plot page holds
LONG = "annotator-with-a-very-long-name"


def ids(k=K):
    return [LONG if a == 0 else f"r{a}" for a in range(k)]


def fit(tmp, labels, model, method, extra=()):
    out = tmp / f"{model}-{method}.json"
    code = main(
        ["fit-noise", str(labels), "--format", "scored", "--model", model, "--method", method,
         "--chains", "2", "--warmup", "40", "--draws", "40", "--prior",
         "none" if model == "boltzmann" else "beta:2,1",
         "--idata", str(tmp / f"{model}-{method}.nc"), "--out", str(out), *extra]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two NUTS fits (symmetric, boltzmann) and an EM fit, diagnosed together; the
    annotators given to the trace and rank plots are recorded."""
    tmp = tmp_path_factory.mktemp("diagnose")
    sim = simulate_labels(num_items=320, num_annotators=K, shared_truth=False, seed=3)
    names = ids()
    frame = pd.DataFrame(
        {"annotator": [names[a] for a in sim.annotator], "label": sim.label, "score": sim.scores}
    )
    labels = tmp / "labels.csv"
    frame.to_csv(labels, index=False)
    fits = {
        "symmetric (nuts)": fit(tmp, labels, "symmetric", "nuts"),
        "boltzmann (nuts)": fit(tmp, labels, "boltzmann", "nuts"),
        "symmetric (em)": fit(tmp, labels, "symmetric", "em"),
    }
    drawn = {"trace": [], "rank": []}
    trace, rank = plots.plot_trace, plots.plot_rank

    def record_trace(idata, annotators, title=""):
        drawn["trace"].append((title, list(annotators)))
        return trace(idata, annotators, title)

    def record_rank(draws, annotators, statistics=None, bins=None, title=""):
        drawn["rank"].append((title, list(annotators)))
        return rank(draws, annotators, statistics, bins, title)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "plot_trace", record_trace)
        patch.setattr(plots, "plot_rank", record_rank)
        path = diagnose(list(fits.values()), tmp / "report", ppc_draws=20)
    return {"path": path, "text": path.read_text(), "fits": fits, "drawn": drawn}


def section(text, heading):
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end > 0 else None]


def test_every_fit_is_reported_in_one_report(report):
    text = report["text"]
    assert text.startswith("# re-po diagnostics: 3 fits to the same labels")
    for name, path in report["fits"].items():
        assert f"\n## {name}\n" in text  # its own section
        assert f"Source: `{path.name}`" in text
        assert f"| {name} | {path.name} |" in section(text, "## Fits")
    across = section(text, "## eta_k under each fit")
    assert all(name in across for name in report["fits"])
    assert "## EM against NUTS: symmetric (em) and symmetric (nuts)" in text
    out = report["path"].parent
    for number in (1, 2, 3):
        assert (out / f"fit{number}-forest.png").stat().st_size > 1000
    assert "![eta_k under each fit](forest-fits.png)" in text


def test_loo_ranks_sampled_posteriors_only(report):
    text = report["text"]
    ranked = section(text, "### Sampled posteriors (ranked)")
    assert "| symmetric (nuts) |" in ranked and "| boltzmann (nuts) |" in ranked
    assert "symmetric (em)" not in ranked
    approximate = section(text, "### Approximate posteriors (not ranked)")
    assert "| symmetric (em) | Laplace approximation at the EM estimate |" in approximate
    assert "nuts" not in approximate
    assert "rank" not in approximate.splitlines()[-2]  # the table's rows carry no rank


def test_warnings_come_first_with_the_names_and_a_remedy(report):
    text = report["text"]
    assert text.index("## Warnings") < text.index("## Fits") < text.index("## Model comparison")
    warnings = section(text, "## Warnings")
    # 2 chains of 40 draws cannot reach 400 effective draws
    assert "**symmetric (nuts)** · `ess_bulk`: bulk ESS under 400" in warnings
    assert "**boltzmann (nuts)** · `ess_bulk`" in warnings
    assert "*Remedy:* more draws per chain (--draws)" in warnings
    assert "- **symmetric (em)**" in warnings  # listed, with its own or "none"


def test_trace_and_rank_plots_show_every_annotator_worst_first(report):
    out = report["path"].parent
    for kind, page_size in (("trace", plots.TRACE_PAGE), ("rank", plots.RANK_PAGE)):
        calls = [a for title, a in report["drawn"][kind] if title.startswith("symmetric (nuts)")]
        shown = [a for page in calls for a in page]
        assert sorted(shown) == sorted(ids()), kind  # every annotator, once
        assert len(calls) == -(-K // page_size)
    assert (out / "fit1-trace.png").is_file() and (out / "fit1-trace-2.png").is_file()
    assert (out / "fit1-rank.png").is_file() and (out / "fit2-rank.png").is_file()
    assert "(fit1-trace-2.png)" in report["text"]
    first = next(a for t, a in report["drawn"]["trace"] if t.startswith("symmetric (nuts)"))
    result = json.loads(report["fits"]["symmetric (nuts)"].read_text())
    r_hat = {a["id"]: a["r_hat"] for a in result["annotators"]}
    assert first[0] == max(r_hat, key=r_hat.get)  # the worst chain mixing on page 1


def test_pareto_k_and_predictive_check_figures(report):
    out, text = report["path"].parent, report["text"]
    for number in (1, 2, 3):
        for figure in ("pareto_k", "predictive"):
            assert (out / f"fit{number}-{figure}.png").stat().st_size > 1000
            assert f"(fit{number}-{figure}.png)" in text
    # unfittable tails (k = inf) are drawn, not dropped
    figure = plots.plot_pareto_k(np.array([0.1, 0.8, np.inf, 1.4]), 0.7, "item")
    points = np.vstack([c.get_offsets() for c in figure.axes[0].collections])
    assert len(points) == 4 and np.isfinite(points).all()
    assert "2 of 4 items" not in figure.axes[0].get_title()  # 3 exceed 0.7
    assert "3 of 4 items above 0.70" in figure.axes[0].get_title()


def test_forest_plot_marks_chance_and_does_not_clip_at_one():
    annotators = pd.DataFrame(
        {
            "id": [LONG, "b", "c"],
            "n_labels": [40, 300, 2],
            "eta": [0.97, 1.0, 0.0],
            "eta_mean": [0.96, 0.999, 0.01],
            "eta_lo90": [0.9, 0.999, 0.0],
            "eta_hi90": [0.99, 1.0, 0.02],
        }
    )
    figure = plots.plot_forest(annotators, None, "t")
    ax = figure.axes[0]
    assert ax.get_xlim()[1] > 1.0  # a point at 1 is drawn whole
    assert ax.get_xlim()[0] < 0.0
    vertical = [line.get_xdata() for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
    assert [0.5, 0.5] in [list(x) for x in vertical]  # the chance line
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert max(len(label.split(" (")[0]) for label in labels) <= plots.LABEL_LENGTH
    assert any("…" in label for label in labels)
    # intervals all far above chance are not squashed to slivers: the axis zooms in
    # and says where 0.5 is
    good = annotators.assign(eta_lo90=[0.95, 0.97, 0.96], eta=[0.97, 0.99, 0.98])
    ax = plots.plot_forest(good).axes[0]
    assert 0.9 < ax.get_xlim()[0] < 0.95 and ax.get_xlim()[1] > 1.0
    assert "0.5, a coin, is off to the left" in ax.get_xlabel()


def boundary_table(tmp):
    path = tmp / "crowd.csv"
    boundary_labels().to_csv(path, index=False)
    return path


def test_one_result_keeps_plain_names_and_flags_the_boundary(tmp_path):
    out = tmp_path / "em.json"
    code = main(
        ["fit-noise", str(boundary_table(tmp_path)), "--format", "binary", "--method", "em",
         "--idata", str(tmp_path / "em.nc"), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    text = diagnose([out], tmp_path / "report", ppc_draws=20).read_text()
    warnings = section(text, "## Warnings")
    assert (
        "`boundary`" in warnings and "good (150 labels" in warnings and "once (1 labels" in warnings
    )
    assert "--prior beta:5,2" in warnings
    assert "## Model comparison" not in text  # one fit: its own PSIS-LOO only
    for figure in ("forest", "w", "pareto_k", "predictive"):
        assert (tmp_path / "report" / f"{figure}.png").is_file()
    # a result written before warnings were recorded: computed when read
    document = json.loads(out.read_text())
    recorded = run_warnings(document)
    del document["warnings"]
    assert run_warnings(document, load_run(out).idata) == recorded


def test_old_nuts_result_gets_its_warnings_from_the_draws(report):
    path = report["fits"]["symmetric (nuts)"]
    document = json.loads(path.read_text())
    recorded = run_warnings(document)
    assert {"ess_bulk", "ess_tail"} <= {w.check for w in recorded}
    del document["warnings"]
    computed = run_warnings(document, load_run(path).idata)
    assert [w.check for w in computed] == [w.check for w in recorded]
