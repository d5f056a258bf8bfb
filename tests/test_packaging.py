"""moecl installed as a user installs it (a wheel, not the source tree) works from any folder."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SUBMIT = textwrap.dedent("""
    import sys
    from types import SimpleNamespace

    from kfp import compiler
    from mlflow import MlflowClient

    import pipelines
    from pipelines import __main__ as cli
    from pipelines.launcher import PipelineSettings, production_settings, submit
    from moecl.mlops.versioning import DataVersion

    assert pipelines.__file__.startswith(sys.argv[1]), pipelines.__file__  # the installed copy
    assert (cli.SAMPLE / "dbpedia" / "train.jsonl").is_file()  # the demo's sample travels with it

    class Cluster:  # the Kubeflow client's side of submit: compile what it is given
        def create_run_from_pipeline_func(self, func, arguments, run_name, experiment_name):
            compiler.Compiler().compile(func, "submitted.yaml")
            return SimpleNamespace(run_id="kfp-run-1")

    uri = "sqlite:///mlflow.db"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("moecl")).info.run_id
    submit(DataVersion("0" * 32, "s3://bucket/dvc"), production_settings(), "http://kfp", uri, run_id,
           client=Cluster())
    """)


def test_the_installed_package_compiles_and_submits_from_another_folder(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True)
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the source tree's editable install
    env.pop("MOECL_CLUSTER_SETTINGS", None)

    compiled = subprocess.run([sys.executable, "-m", "pipelines", "compile"], cwd=elsewhere, env=env,
                              capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    spec = next(yaml.safe_load_all((elsewhere / "continual_training.yaml").read_text()))
    assert spec["pipelineInfo"]["name"] == "moecl-continual-training"
    assert not (target / "pipelines" / "compiled").exists()  # nothing written into the installed package

    submitted = subprocess.run([sys.executable, "-c", SUBMIT, str(target)], cwd=elsewhere, env=env,
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert (elsewhere / "submitted.yaml").read_text() == (elsewhere / "continual_training.yaml").read_text()
