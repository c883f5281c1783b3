"""A non-editable install works from an empty folder, as a user's ``pip install`` does.

The wheel is built from a copy of the sources (``pip wheel --no-deps
--no-build-isolation``: the build uses this interpreter's setuptools, nothing is
downloaded) and installed with ``--no-deps`` into a fresh virtual environment that sees
this interpreter's packages (torch, transformers, ...) but not this checkout: commands
run in an empty folder with ``PYTHONPATH`` unset, and ``repo`` must import from the new
environment. The model recipes and the tiny model's files (``models/``) must come with
the wheel, as ``repo/models``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import repo

ROOT = Path(repo.__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "repo", "models")


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this checkout's sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run(pip + ["--wheel-dir", str(tmp / "dist"), str(src)], cwd=tmp)
    (built,) = (tmp / "dist").glob("re_po-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict[str, Path]:
    """A fresh virtual environment holding the wheel; its python and its ``re-po``."""
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    if sys.prefix != sys.base_prefix:
        # Running inside a virtual environment: the new one's "system" packages are the
        # base interpreter's, so name this one's site-packages too. A path line in a .pth
        # file adds the folder without running its .pth files (no editable re-po hook).
        purelib = sysconfig.get_path("purelib", vars={"base": str(env_dir)})
        lines = "".join(f"{p}\n" for p in site.getsitepackages())
        (Path(purelib) / "_outer_environment.pth").write_text(lines, encoding="utf-8")
    bindir = Path(sysconfig.get_path("scripts", vars={"base": str(env_dir)}))
    python = bindir / Path(sys.executable).name
    if not python.exists():
        python = bindir / ("python.exe" if os.name == "nt" else "python")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    _run(pip + ["--no-deps", "--no-index", str(wheel)], cwd=tmp)
    return {"root": env_dir, "python": python, "re-po": bindir / "re-po"}


def _clean_env() -> dict[str, str]:
    """This environment without anything that points ``repo`` or its models elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "RE_PO_MODELS_DIR"}}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def test_the_wheel_carries_every_module_and_the_models_folder(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "repo").rglob("*.py")}
    missing = sorted(modules - names)
    assert not missing, (
        f"the wheel lacks {missing}: add their packages to [tool.setuptools] packages "
        "in pyproject.toml"
    )
    models = {
        "repo/models/" + p.relative_to(ROOT / "models").as_posix()
        for p in (ROOT / "models").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "repo/models/tiny-llama/model.safetensors" in models
    assert not models - names, sorted(models - names)
    for source in ("pandalm", "hh-rlhf"):  # the shipped data, each with its licence
        assert f"repo/resources/data/{source}/LICENSE" in names
    assert "repo/resources/data/pandalm/testset-v1.json" in names
    assert "repo/resources/data/hh-rlhf/subsample.jsonl.gz" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_states_its_licence(wheel):
    """The project's licence as an SPDX expression (core metadata 2.4), and its text."""
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    fields = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in fields
    assert "License-File: LICENSE" in fields
    licence = metadata.replace("METADATA", "licenses/LICENSE")
    assert "Apache License" in archive.read(licence).decode()


@pytest.mark.slow
def test_the_installed_wheel_runs_the_quick_demo_from_an_empty_folder(installed, tmp_path):
    """``re-po demo --quick`` finds the ``tiny-llama`` recipe in the installed package
    and runs its whole pipeline (training, evaluation, report, diagnostics) there, on
    fewer pairs and one epoch (tests/test_demo.py checks what the demo recovers)."""
    work = tmp_path / "empty"
    work.mkdir()
    env = _clean_env()
    probe = (
        "import json, repo\n"
        "from repo.policy import list_recipes, models_dir\n"
        "print(json.dumps({'repo': repo.__file__, 'models': str(models_dir()), "
        "'recipes': list_recipes()}))\n"
    )
    where = json.loads(_run([str(installed["python"]), "-c", probe], cwd=work, env=env).stdout)
    venv_root = installed["root"].resolve()
    assert Path(where["repo"]).resolve().is_relative_to(venv_root), where
    assert Path(where["models"]) == Path(where["repo"]).parent / "models"
    assert {"tiny-llama", "smollm2-135m-instruct"} <= set(where["recipes"])

    demo = [str(installed["re-po"]), "demo", "--quick", "--out", "out"]
    demo += ["--train-pairs", "16", "--test-pairs", "8", "--epochs", "1"]
    done = _run(demo, cwd=work, env=env, timeout=600)
    assert "is not available" not in done.stdout  # the recipe was found, nothing replaced
    out = work / "out"
    assert done.stdout.rstrip().endswith(f"report: {Path('out') / 'report.md'}")
    result = json.loads((out / "demo.json").read_text())
    assert result["settings"]["recipe"] == "tiny-llama"
    assert set(result["accuracy"]) == {"dpo", "re-dpo"}
    for values in result["accuracy"].values():
        assert 0 <= values["held_out"] <= 1
    for run in ("dpo", "re-dpo"):
        config = json.loads((out / run / "config.json").read_text())
        assert config["recipe"] == "tiny-llama"
        assert (out / run / "reliability.json").is_file()
    assert (out / "report.md").read_text().strip()
    assert (out / "diagnostics" / "report.md").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # nothing else written here
