"""Every benchmarks/*.py script starts: `--help` exits 0 and prints its usage line.

The benchmarks run for hours and are not part of the suite, so a script that no longer imports or
parses its arguments (round_soup.py once named an unimported INTENSITIES) would only show when
someone next ran it. Run in process (runpy, as `python script --help` does): torch is imported once.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def test_the_benchmarks_folder_has_its_scripts():
    assert {"quality.py", "speed.py", "round_soup.py", "train_checkpoints.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_a_benchmark_script_prints_its_usage(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])  # as `python benchmarks/x.py` puts it first
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"usage: {script.name}" in out, out[:500]
