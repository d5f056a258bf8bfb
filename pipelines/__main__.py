"""`python -m pipelines compile` writes the cluster pipeline YAML;
`python -m pipelines demo` runs the whole pipeline embedded on the shipped sample, twice:
data v1 (dbpedia, agnews), then v2 adding yelp, each picked up by the trigger."""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

COMPILED = Path(__file__).with_name("compiled") / "continual_training.yaml"
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "mtl5"
DEMO_VERSIONS = (("v1", ["dbpedia", "agnews"]), ("v2", ["yelp"]))


def compile_pipeline(out: Path = COMPILED) -> Path:
    from kfp import compiler

    from .launcher import cluster_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cluster_pipeline(), str(out))
    return out


def _report(tracking_uri: str, run_id: str, seconds: float) -> None:
    from moecl import registry

    run = registry.connect(tracking_uri).get_run(run_id)
    steps = {k.removeprefix("seconds."): v for k, v in run.data.metrics.items() if k.startswith("seconds.")}
    accuracy = {k.removeprefix("accuracy."): v for k, v in run.data.metrics.items() if k.startswith("accuracy.")}
    print(f"  outcome: {run.data.tags.get(registry.TAG_OUTCOME)}; wall {seconds:.0f}s; steps: "
          + ", ".join(f"{name} {value:.0f}s" for name, value in steps.items()))
    print("  accuracy: " + ", ".join(f"{task} {value:.2f}" for task, value in accuracy.items()))


def demo(workdir: Path, settings_path: Path | None) -> None:
    from moecl import registry
    from moecl.trigger import trigger
    from moecl.versioning import init_project, snapshot

    from .launcher import PipelineSettings, Workdir, run_embedded

    settings = PipelineSettings.load(settings_path) if settings_path else PipelineSettings.load()
    work = Workdir(workdir)
    project = init_project(workdir / "project", workdir / "dvc-remote")

    def launch(version):
        return run_embedded(version, settings, work)

    for name, tasks in DEMO_VERSIONS:
        for task in tasks:
            if not (project / "data" / task).exists():
                shutil.copytree(SAMPLE / task, project / "data" / task)
        version = snapshot(project)
        print(f"\n== data {name}: {version.short} ({', '.join(sorted(p.name for p in (project / 'data').iterdir()))})",
              flush=True)
        started = time.time()
        run_id = trigger(project, work.tracking_uri, launch)
        if run_id is None:
            print("  already processed")
        else:
            _report(work.tracking_uri, run_id, time.time() - started)
    started = time.time()
    again = trigger(project, work.tracking_uri, launch)
    print(f"\n== trigger with no data change: {'no run' if again is None else again} ({time.time() - started:.1f}s)")
    champion = registry.alias_version(work.tracking_uri, settings.model_name, registry.CHAMPION)
    previous = registry.alias_version(work.tracking_uri, settings.model_name, registry.PREVIOUS)
    print(f"\nregistered model '{settings.model_name}': champion = version {champion}, previous-champion = {previous}")
    print(f"review the runs:  .venv/bin/mlflow ui --backend-store-uri {work.tracking_uri}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines")
    commands = parser.add_subparsers(dest="command", required=True)
    comp = commands.add_parser("compile", help="write the pipeline YAML for a Kubeflow cluster")
    comp.add_argument("--out", type=Path, default=COMPILED)
    run = commands.add_parser("demo", help="run the pipeline embedded on the shipped sample (v1, then v2)")
    run.add_argument("--workdir", type=Path, default=Path("work/demo"))
    run.add_argument("--settings", type=Path, help="pipeline settings (default: pipelines/settings.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.command == "compile":
        print(compile_pipeline(args.out))
    else:
        demo(args.workdir, args.settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
