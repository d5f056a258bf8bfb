"""The benchmark scripts run as `python benchmarks/X.py`, which puts benchmarks/ first on sys.path: a
script named like an installed package hides that package from every import, transformers' own included
(transformers 5.25 imports `kernels`, which once made benchmarks/kernels.py break every benchmark)."""
from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def installed(name: str) -> bool:
    """Whether `name` imports from somewhere other than benchmarks/ (sys.modules not consulted: another
    test may have imported a script)."""
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
    return name in sys.builtin_module_names or importlib.machinery.PathFinder.find_spec(name, elsewhere) is not None


def test_no_benchmark_script_shadows_an_installed_module():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert scripts, BENCHMARKS
    assert installed("json") and installed("transformers")  # the check sees the standard library and site-packages
    shadowing = [name for name in scripts if installed(name)]
    assert shadowing == [], f"rename these benchmark scripts, installed modules share their names: {shadowing}"


def test_the_training_core_imports_with_benchmarks_first_on_the_path():
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import moecl.trainer, moecl.scoring"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_workers_sharing_an_out_folder_build_a_derived_task_once(tmp_path, monkeypatch):
    """quality.py's workers (one per core) may start together: each must get the whole derived task."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from quality import DERIVED, task_folder

    task, (source, mapping) = next(iter(DERIVED.items()))
    labels = list(mapping)
    for split in ("train", "test"):
        rows = [{"text": f"{split} text {i}", "label": labels[i % len(labels)]} for i in range(2000)]
        (tmp_path / source).mkdir(exist_ok=True)
        (tmp_path / source / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = threading.Barrier(6)

    def build():
        start.wait()
        return task_folder(task, tmp_path, tmp_path / "out")

    with ThreadPoolExecutor(6) as pool:
        folders = [f.result() for f in [pool.submit(build) for _ in range(6)]]
    assert set(folders) == {tmp_path / "out" / "derived" / task}
    built = folders[0]
    assert json.loads((built / "labels.json").read_text()) == list(dict.fromkeys(mapping.values()))
    assert len((built / "train.jsonl").read_text().splitlines()) == 2000
    assert sorted(p.name for p in (tmp_path / "out" / "derived").iterdir()) == [task]  # no staging left
