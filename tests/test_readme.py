"""The README's test command is exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n((?:sh scripts/system-deps.sh && )?python3 -m venv[^\n]+)\n```", readme)
    assert len(commands) == 2, commands
    main_job, test_cmd = commands
    assert "stethoscope demo" in main_job and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
