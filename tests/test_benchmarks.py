"""The benchmark scripts run as `python benchmarks/X.py`, which puts benchmarks/ first on sys.path: a
script named like an installed package hides that package from every import, transformers' own included
(transformers 5.25 imports `kernels`, which once made benchmarks/kernels.py break every benchmark)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert scripts, BENCHMARKS
    shadowing = [name for name in scripts if importlib.util.find_spec(name) is not None]
    assert shadowing == [], f"rename these benchmark scripts, installed modules share their names: {shadowing}"


def test_the_training_core_imports_with_benchmarks_first_on_the_path():
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import moecl.trainer, moecl.scoring"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
