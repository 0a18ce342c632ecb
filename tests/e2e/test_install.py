"""`pip install -e .` into a fresh virtual environment, then README.md's "Use it from Python" example, run from a
folder outside the repository. Offline: the fresh environment sees this one's packages through a .pth file (what
`pip install -r requirements.txt` would have given it), and pip installs only the project, without its index."""
import ast
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lsr_core.tiny import make_collection, make_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MODEL = '"runs/demo/trained"'  # the model the README example loads; the test gives it a tiny one


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", text, re.S)
    assert match, "README.md: no python block between <!-- api-example --> markers"
    code = match.group(1)
    assert len(code.splitlines()) <= 10 and code.count(EXAMPLE_MODEL) == 1
    return code


def fresh_python(venv: Path) -> Path:
    """A new virtual environment whose site-packages point at this one's (the project's dependencies), without
    the project itself; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    # addsitedir (not a bare path line): the .pth files in there are processed as in their own environment
    Path(site, "_dependencies.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    return python


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_pip_install_e_runs_the_readme_example(tmp_path):
    python = fresh_python(tmp_path / "venv")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    env = clean_env()
    where = "import lsr_core; print(lsr_core.__file__)"
    before = subprocess.run([str(python), "-c", where], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert before.returncode == 1 and "No module named 'lsr_core'" in before.stderr  # not there until installed

    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-e", str(ROOT)], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    after = subprocess.run([str(python), "-c", where + "; import importlib.metadata as m; "
                            "print(m.version('decoder-lsr')); import train"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    lines = after.stdout.splitlines()
    assert lines[:2] == [str(ROOT / "lsr_core" / "__init__.py"), "0.1.0"], after.stderr
    assert "No module named 'train'" in after.stderr  # the package only: the scripts stay in the repository

    col = make_collection(tmp_path / "data")
    model = make_model(tmp_path / "bert", "bert", col["words"])
    script = elsewhere / "example.py"
    script.write_text(readme_example().replace(EXAMPLE_MODEL, repr(str(model))))
    done = subprocess.run([str(python), str(script)], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()[-2:]
    run, scores = map(ast.literal_eval, printed)  # the example prints the run, then its scores
    assert set(run) == {"q1"} and set(run["q1"]) == {"d1", "d2"}  # an untrained MLM head expands to many terms
    assert set(scores) == {"mrr@10", "ndcg@10", "recall@100", "recall@1000"}
    assert (elsewhere / "runs" / "api" / "index" / "engine.json").is_file()  # the index, under the example's cwd

    ranking = list(run["q1"])
    assert list(run["q1"].values()) == sorted(run["q1"].values(), reverse=True)
    assert scores["mrr@10"] == 1 / (ranking.index("d1") + 1) and scores["recall@100"] == 1.0


def test_declared_dependencies_are_met_by_the_pinned_ones():
    """Every requirement of pyproject.toml (extras too) holds for what requirements.txt pins, so `pip install -e .`
    after `make` downloads nothing (a CUDA torch stays as installed: torch has a floor, not a pin)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, _, pinned = line.partition("==")
            pins[name.lower().replace("_", "-")] = pinned
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in map(Requirement, declared):
        name = requirement.name.lower().replace("_", "-")
        have = pins.get(name)
        if have is None:  # not pinned there (a dependency of a pinned package): the installed version
            try:
                have = version(requirement.name)
            except PackageNotFoundError:
                pytest.fail(f"{requirement} is neither pinned in requirements.txt nor installed")
        assert requirement.specifier.contains(have, prereleases=True), f"{requirement} vs {have}"
    torch = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch"))
    assert not any(spec.operator in ("==", "~=", "===") for spec in torch.specifier)


def test_the_api_names_load_without_torch():
    """`import lsr_core` and its API names stay light (every script imports lsr_core.config first)."""
    code = ("import sys, lsr_core; fns = [lsr_core.load, lsr_core.build_index, lsr_core.evaluate, lsr_core.Encoder]; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(lsr_core.__all__))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['Encoder',", "'build_index',", "'evaluate',", "'load',", "'load_index',",
                                   "'search']"]
