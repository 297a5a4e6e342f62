"""The README's Python example runs verbatim (only its database URL is pointed at the test's database)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API (a backend service)", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.storage
def test_the_readme_python_example_runs_as_written(db_url, tmp_path):
    code = python_example()
    assert "add_site" in code and "approve_icf_version" in code and "StudyReader" in code
    assert "/test" not in code  # a throwaway database, not the test database
    if not db_url.startswith("sqlite"):
        code, n = re.subn(r"^url = .*$", f"url = {db_url!r}", code, count=1, flags=re.M)
        assert n == 1
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "6 signed events of NJ01-0007" in lines
    assert any("CREAT (mg/dL) 1.10 → 1.01 transcription error" in line for line in lines)
    assert lines[-2:] == ["CONSENTED", "SCREENED"]
