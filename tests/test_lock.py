"""`.ci/check_lock.py`: the lock files agree with pyproject.toml, and any drift fails CI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "check_lock.py"
FILES = ("pyproject.toml", "requirements.lock", "requirements-dev.lock")


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for name in FILES:
        shutil.copyfile(ROOT / name, tmp_path / name)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def test_the_real_files_agree() -> None:
    result = run_check(ROOT)
    assert result.returncode == 0, result.stderr
    assert "agree with pyproject.toml" in result.stdout


def test_the_copy_agrees_too(copy: Path) -> None:
    assert run_check(copy).returncode == 0


def test_a_new_dependency_without_make_lock_fails(copy: Path) -> None:
    edit(
        copy / "pyproject.toml", '    "jinja2>=3.1",\n', '    "jinja2>=3.1",\n    "httpx>=0.28",\n'
    )
    result = run_check(copy)
    assert result.returncode == 1
    assert "httpx" in result.stderr
    assert "other dependency tables" in result.stderr
    assert "make lock" in result.stderr


def test_a_tightened_specifier_fails(copy: Path) -> None:
    edit(copy / "pyproject.toml", '"structlog>=24.4"', '"structlog>=27"')
    result = run_check(copy)
    assert result.returncode == 1
    assert re.search(r"structlog==\S+ does not satisfy 'structlog>=27'", result.stderr)


def test_a_new_dev_tool_fails(copy: Path) -> None:
    edit(copy / "pyproject.toml", '    "ruff>=0.8",\n', '    "ruff>=0.8",\n    "py-spy>=0.4",\n')
    result = run_check(copy)
    assert result.returncode == 1
    assert "requirements-dev.lock: py-spy" in result.stderr
    assert "requirements.lock: py-spy" not in result.stderr  # dev tools stay out of the image


def test_comments_and_layout_of_pyproject_do_not_count(copy: Path) -> None:
    edit(copy / "pyproject.toml", '    "jinja2>=3.1",\n', '    # a comment\n    "jinja2>=3.1" ,\n')
    edit(copy / "pyproject.toml", "timeout = 60", "timeout = 61")
    assert run_check(copy).returncode == 0


def test_a_hand_edited_lock_fails(copy: Path) -> None:
    lock = copy / "requirements.lock"
    edit(lock, "aiohttp==3.", "aiohttp==2.")
    result = run_check(copy)
    assert result.returncode == 1
    assert "aiohttp" in result.stderr


def test_a_lock_without_hashes_fails(copy: Path) -> None:
    lock = copy / "requirements-dev.lock"
    lock.write_text(re.sub(r" \\\n\s+--hash=sha256:[0-9a-f]{64}", "", lock.read_text()))
    result = run_check(copy)
    assert result.returncode == 1
    assert "has no sha256 hash" in result.stderr


def test_the_stamp_is_what_make_lock_writes(copy: Path) -> None:
    """--stamp after a pyproject edit is what makes the digest line match again."""
    pyproject = copy / "pyproject.toml"
    edit(pyproject, '"structlog>=24.4"', '"structlog>=25"')  # still satisfied by the lock
    assert run_check(copy).returncode == 1
    stamped = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(copy), "--stamp"], timeout=30, check=False
    )
    assert stamped.returncode == 0
    assert run_check(copy).returncode == 0
    for name in ("requirements.lock", "requirements-dev.lock"):
        assert (copy / name).read_text().count("# pyproject-deps-sha256: ") == 1
