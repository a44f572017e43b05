"""The project as the worker image installs it: a wheel in a fresh virtual environment, not
editable, run from outside the checkout. The environment borrows this one's dependencies
through a .pth file (nothing is downloaded), so the project's own code is the wheel's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a clean copy of the sources the package is made of (an in-place build
    would reuse a stale build/ folder); offline, with this environment's setuptools."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", dist, src, cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("rs_pseudolabel-*.whl")
    return wheel


def test_the_wheel_installed_in_a_fresh_venv_runs_and_finds_its_recipes(tmp_path: Path):
    wheel = _wheel(tmp_path)
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--quiet", wheel, cwd=tmp_path)  # fmt: skip
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp_path).stdout.strip())  # fmt: skip
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # Run beside a user's own package called `data` (and one called `pipeline`): the wheel
    # installs one name, so neither shadows the project's modules nor is shadowed by them.
    work = tmp_path / "elsewhere"
    for own in ("data", "pipeline"):
        (work / own).mkdir(parents=True)
        (work / own / "__init__.py").write_text(
            "raise ImportError('a user package was imported')\n"
        )
    demo_help = _run(venv / "bin" / "pipeline", "demo", "--help", cwd=work)
    assert "usage: pipeline demo" in demo_help.stdout
    models = _run(venv / "bin" / "pipeline", "models", cwd=work)
    assert "rs-420" in models.stdout and "rs-mini" in models.stdout
    module = _run(python, "-m", "rs_pseudolabel.pipeline", "models", cwd=work)
    assert module.stdout == models.stdout

    probe = """
from rs_pseudolabel import configs, pipeline
from rs_pseudolabel.pipeline import demo
from rs_pseudolabel.students import config
print(pipeline.__file__)
print(configs.__file__)
print(config.resolve_recipe("imagenet", model="rs-152").image_size)
print(config.resolve_recipe(config.load_yaml(demo.DEFAULT_RECIPE)["recipe"]).model)
"""
    lines = _run(python, "-c", probe, cwd=work).stdout.splitlines()
    assert all(Path(line).is_relative_to(site) for line in lines[:2]), lines
    assert lines[2:] == ["256", "rs-mini"]

    shown = _run(python, "-m", "pip", "show", "-f", "rs-pseudolabel", cwd=work).stdout
    files = [line.strip() for line in shown.split("Files:", 1)[1].splitlines() if line.strip()]
    tops = {Path(f).parts[0] for f in files if not f.startswith("..")}  # scripts: bin/
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rs_pseudolabel"}, tops
    assert [f for f in files if f.startswith("..")] == ["../../../bin/pipeline"]
