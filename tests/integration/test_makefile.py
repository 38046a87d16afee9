"""The Makefile's first check: Python >= 3.11, named before anything is built (issue 17.3).

Every target here is run with VENV pointing into tmp_path and PYTHON pointing at a fake
interpreter, so nothing is installed: the check must stop make before `python -m venv`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed")


def fake_python(tmp_path: Path, version: str) -> Path:
    """A script that answers a version query like Python `version` would, and fails anything else
    (`-m venv`, `-m pip`) loudly, so a Makefile that goes past the check is caught."""
    path = tmp_path / f"python{version}"
    path.write_text(
        "#!/bin/sh\n"
        f'case "$1" in -c) echo {version};; *) echo "fake python {version} was asked to run: $*" >&2; exit 3;; esac\n'
    )
    path.chmod(0o755)
    return path


def make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return subprocess.run([MAKE or "make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("target", ["check-python", "install", "run", "cluster", "install-test", "test"])
def test_an_older_python_is_refused_first_with_what_is_needed(tmp_path, target):
    venv = tmp_path / "venv"
    out = make(target, f"PYTHON={fake_python(tmp_path, '3.9')}", f"VENV={venv}")
    assert out.returncode != 0
    assert "needs Python 3.11 or newer" in out.stderr, out.stderr
    assert "is Python 3.9" in out.stderr
    assert f"make {target} PYTHON=python3.11" in out.stderr
    assert "fake python" not in out.stderr, "make went past the check and ran the old interpreter"
    assert not venv.exists(), "nothing is built with an older Python"


def test_a_missing_interpreter_is_named(tmp_path):
    out = make("run", f"PYTHON={tmp_path / 'python3.11-not-here'}", f"VENV={tmp_path / 'venv'}")
    assert out.returncode != 0
    assert "needs Python 3.11 or newer" in out.stderr and "did not run as a Python interpreter" in out.stderr, out.stderr
    assert "make run PYTHON=python3.11" in out.stderr


def test_a_venv_made_by_an_older_python_says_make_clean(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(fake_python(tmp_path, "3.10"), venv / "bin" / "python")
    out = make("run", f"PYTHON={sys.executable}", f"VENV={venv}")
    assert out.returncode != 0
    assert "is Python 3.10" in out.stderr and "make clean" in out.stderr, out.stderr


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.13", "4.0"])
def test_python_311_and_newer_pass_the_check(tmp_path, version):
    out = make("check-python", f"PYTHON={fake_python(tmp_path, version)}", f"VENV={tmp_path / 'venv'}")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_this_interpreter_passes_the_check(tmp_path):
    out = make("check-python", f"PYTHON={sys.executable}", f"VENV={tmp_path / 'venv'}")
    assert out.returncode == 0, out.stderr


def test_install_targets_install_from_the_hash_checked_locks_only(tmp_path):
    # -n: print the recipes, run nothing. Every pip install is either hash-checked from a lock
    # file or the project itself without dependencies and without a build environment to fetch.
    out = make("-n", "install-test", f"PYTHON={sys.executable}", f"VENV={tmp_path / 'venv'}")
    assert out.returncode == 0, out.stderr
    installs = [line for line in out.stdout.splitlines() if "/pip install" in line]
    assert any("--require-hashes -r requirements/run.lock" in line for line in installs), installs
    assert any("--require-hashes -r requirements/test.lock" in line for line in installs), installs
    for line in installs:
        assert "--require-hashes" in line or ("--no-deps" in line and "--no-build-isolation" in line and line.endswith("-e .")), line
    assert out.stdout.index("requirements/run.lock") < out.stdout.index("grpc_tools.protoc"), "stubs are built by the locked grpcio-tools"
