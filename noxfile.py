"""One front door for every workflow: tests, lint, build, quickstart, bench, docs.

nox -l                      # list sessions
nox -s tests                # every package in its own venv, then the cross-package e2e tests
nox -s "tests(llm-core)"    # one package
nox -s lint                 # ruff check + ruff format --check
nox -s quickstart           # the README's main job
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ["llm-kernels", "llm-core", "llm-convert", "llm-train", "llm-serve"]
# Test extras each package's tests need; a package's venv holds only it and its own dependencies.
TEST_TARGETS = {name: [f"./packages/{name}[test]"] for name in PACKAGES}
TEST_TARGETS["e2e"] = [f"./packages/{name}[test]" for name in PACKAGES]

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False  # fresh venvs: uv makes them in seconds


def _works(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "True"


def find_python() -> str:
    """A Python >= 3.12: $LLM_PYTHON, python3.12+ on PATH, or a pyenv install (no hand set-up)."""
    candidates = [os.environ.get("LLM_PYTHON", "")]
    candidates += [shutil.which(f"python3.{minor}") or "" for minor in (12, 13, 14)]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.1[2-9]*/bin/python3"))
    candidates += [shutil.which("python3") or ""]
    for candidate in candidates:
        if candidate and _works(candidate):
            return candidate
    raise SystemExit(
        "nox: no Python >= 3.12 found; install one or set LLM_PYTHON=/path/to/python3.12"
    )


PYTHON = find_python()


def _has_tests(target: str) -> bool:
    folder = ROOT / "tests" if target == "e2e" else ROOT / "packages" / target / "tests"
    return any(folder.glob("test_*.py"))


@nox.session(python=PYTHON)
@nox.parametrize("target", [nox.param(t, id=t) for t in [*PACKAGES, "e2e"]])
def tests(session: nox.Session, target: str) -> None:
    """Run one package's tests in a venv holding only that package (+ its test extra)."""
    if target != "e2e" and not (ROOT / "packages" / target).exists():
        session.skip(f"{target} does not exist yet")
    if not _has_tests(target):
        session.skip(f"{target} has no tests yet")
    targets = [t for t in TEST_TARGETS[target] if (ROOT / t.split("[")[0]).exists()]
    session.install(*targets)
    folder = "tests" if target == "e2e" else f"packages/{target}/tests"
    session.run(
        "python",
        "-m",
        "pytest",
        folder,
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(ROOT),
        *session.posargs,
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Wheels for every package into dist/ (the kernels wheel carries the compiled extension)."""
    session.install("build", "uv")
    out = ROOT / "dist"
    for name in PACKAGES:
        if (ROOT / "packages" / name).exists():
            session.run("uv", "build", "--wheel", "-o", str(out), f"packages/{name}")
    session.log(f"wheels in {out}: {sorted(p.name for p in out.glob('*.whl'))}")


@nox.session(python=PYTHON)
def quickstart(session: nox.Session) -> None:
    """The README's main job: train a small model on the standard library's .py files, then generate.

    Extra arguments go to the script: `nox -s quickstart -- --minutes 1 --prompt 'def fib(n):'`.
    """
    session.install(
        "./packages/llm-train", "./packages/llm-serve"
    )  # llm-serve generates the sample
    session.run("python", "-m", "llm_train.quickstart", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Performance scripts in benchmarks/ (ratios against a baseline run in the same script)."""
    session.install(
        *[f"./packages/{n}[test]" for n in PACKAGES if (ROOT / "packages" / n).exists()]
    )
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    if session.posargs:
        scripts = [s for s in scripts if s.stem in session.posargs]
    for script in scripts:
        session.run("python", str(script))


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Execute every ```python snippet in docs/*.md so the docs stay true to the code."""
    session.install(
        *[f"./packages/{n}[test]" for n in PACKAGES if (ROOT / "packages" / n).exists()]
    )
    session.run("python", "-m", "pytest", "tests/test_docs.py", "-q", "-p", "no:cacheprovider")


@nox.session(python=PYTHON)
def install_check(session: nox.Session) -> None:
    """`pip install packages/llm-convert` must not pull in grain or a web server."""
    session.install("./packages/llm-convert", "packaging")
    session.run("python", "tests/check_install.py", "llm-convert")
