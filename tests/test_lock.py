"""The committed lock (uv.lock) is what runs: installed exactly, and never silently stale."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".tools" / "bin" / "uv"
ENV = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}

pytestmark = pytest.mark.skipif(not UV.exists(), reason="uv is installed by dev.sh")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def test_the_environment_is_exactly_the_lock() -> None:
    """What pytest runs on is what uv.lock pins (uv compares every package, extras included)."""
    env = {**ENV, "UV_PROJECT_ENVIRONMENT": str(ROOT / ".venv")}
    result = subprocess.run(
        [str(UV), "sync", "--locked", "--all-extras", "--check", "--offline"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_printed_versions_are_the_environments() -> None:
    """Regression: with UV_PYTHON set, `uv pip list` listed the system interpreter's
    packages, so the test command printed versions that were not the ones under test."""
    result = _run(["bash", "dev.sh", "versions"], ROOT)
    assert result.returncode == 0, result.stderr
    printed = {
        name: version for name, version in re.findall(r"([A-Za-z0-9_.-]+)==(\S+)", result.stderr)
    }
    installed = {
        re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(): dist.version
        for dist in importlib.metadata.distributions()
    }
    assert printed == installed


def _project_copy(tmp_path: Path) -> Path:
    for name in ("dev.sh", "pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "uv.txt", tmp_path / ".ci" / "uv.txt")
    (tmp_path / ".tools").symlink_to(ROOT / ".tools")
    return tmp_path


def test_the_committed_lock_matches_pyproject(tmp_path: Path) -> None:
    result = _run(["bash", "dev.sh", "lock-check"], _project_copy(tmp_path))
    assert result.returncode == 0, result.stderr


def test_a_stale_lock_fails_the_test_command_with_a_clear_message(tmp_path: Path) -> None:
    """Regression (issue 7): nothing tied installs to a lock, so a fresh clone resolved
    whatever had been released since (uvicorn 0.55) and broke the suite."""
    project = _project_copy(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('"pyjwt>=2.8",', '"pyjwt>=2.8",\n    "six>=1.16",', 1))
    assert pyproject.read_text() != text
    result = _run(["bash", "dev.sh", "lock-check"], project)
    assert result.returncode == 1
    assert "uv.lock" in result.stderr and "bash dev.sh lock" in result.stderr
