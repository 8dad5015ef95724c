"""README's configuration table is generated from the settings' declarations: it cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> str:
    """The table of README's "## Configuration" section: its lines that start with `|`."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_readme_shows_every_setting_as_declared(capsys: pytest.CaptureFixture[str]) -> None:
    main(["settings", "--markdown"])
    generated = capsys.readouterr().out.strip()
    assert readme_table() == generated, (
        "README's configuration table differs from the settings' declarations: replace it with "
        "the output of `python -m service settings --markdown`"
    )
