"""The commands that drive the pipeline (also installed as `moecl-pipeline`):

    python -m pipelines compile                  write the cluster pipeline YAML
    python -m pipelines demo                     the whole pipeline embedded on the shipped sample, three
                                                 data versions: v1 dbpedia, v2 adds agnews, v3 adds yelp
    python -m pipelines trigger | watch          launch a run for the version in data.dvc when it is due
    python -m pipelines status                   champion, versions seen and their state, last gate decision
    python -m pipelines rollback                 give `champion` back (to `previous-champion` or --to VERSION)

Embedded runs keep MLflow, artifacts and KFP outputs in --workdir; with --host, runs go to a
Kubeflow Pipelines cluster and MLflow is at --tracking-uri.

Exit status: 0 done (a run launched, or nothing due), 2 a usage or settings error, 3 the data
version was refused by validation (its violations are printed: file, row, rule), 1 anything else.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import warnings
import sys
import time
from pathlib import Path

from . import shipped

REFUSED = 3  # exit status: the data version was refused by validation
SHOWN_VIOLATIONS = 5  # a refusal prints this many violations, then how many more there are
IMAGE_HELP = ("run each embedded step in a container of this image (built from infra/Dockerfile), through "
              "Docker or podman's Docker API at DOCKER_HOST")
# In a source checkout the compiled YAML is kept (and checked) beside the pipeline; an installed
# package writes it to the current folder.
SOURCE_CHECKOUT = (Path(__file__).resolve().parents[1] / "pyproject.toml").is_file()
COMPILED = (Path(__file__).with_name("compiled") if SOURCE_CHECKOUT else Path.cwd()) / "continual_training.yaml"
SAMPLE = shipped("samples") / "mtl5"
# v2's new task is one the sample's budget learns (promoted); v3's, 5-way star ratings, it does not
# (refused: not clearly above chance).
DEMO_VERSIONS = (("v1", ["dbpedia"]), ("v2", ["agnews"]), ("v3", ["yelp"]))


def compile_pipeline(out: Path = COMPILED) -> Path:
    from kfp import compiler

    from .launcher import cluster_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cluster_pipeline(), str(out))
    return out


def _report(tracking_uri: str, run_id: str, seconds: float) -> None:
    from moecl.mlops import registry

    run = registry.connect(tracking_uri).get_run(run_id)
    steps = {k.removeprefix("seconds."): v for k, v in run.data.metrics.items() if k.startswith("seconds.")}
    accuracy = {k.removeprefix("accuracy."): v for k, v in run.data.metrics.items() if k.startswith("accuracy.")}
    scoring = run.data.metrics.get("train_scoring_seconds")
    print(f"  outcome: {run.data.tags.get(registry.TAG_OUTCOME)}; wall {seconds:.0f}s; steps: "
          + ", ".join(f"{name} {value:.0f}s" for name, value in steps.items())
          + (f" (the train step's scoring: {scoring:.0f}s)" if scoring is not None else ""))
    print("  accuracy: " + ", ".join(f"{task} {value:.2f}" for task, value in accuracy.items()))
    for version in registry.connect(tracking_uri).search_model_versions(f"run_id='{run_id}'"):
        if version.tags.get("moecl.rejection_reasons"):
            print(f"  why version {version.version} was not promoted: {version.tags['moecl.rejection_reasons']}")


def _containers(image: str | None):
    """With --image, the embedded run's steps run in containers of that image (Docker, or podman's
    Docker-compatible service at DOCKER_HOST) sharing this machine's backbone cache."""
    if not image:
        return None
    from moecl.backbone import cache_root

    from .containers import StepContainers

    return StepContainers(cache_root())


def demo(workdir: Path, settings_path: Path | None, verbose: bool = False, image: str | None = None) -> None:
    from moecl.mlops import registry
    from moecl.mlops.trigger import trigger
    from moecl.mlops.versioning import init_project, snapshot

    from .launcher import PipelineSettings, Workdir, run_embedded

    settings = PipelineSettings.load(settings_path) if settings_path else PipelineSettings.load()
    work = Workdir(workdir)
    project = init_project(workdir / "project", workdir / "dvc-remote")
    containers = _containers(image)

    def launch(version, run_id):
        run_embedded(version, settings, work, run_id, verbose, containers)

    for name, tasks in DEMO_VERSIONS:
        for task in tasks:
            if not (project / "data" / task).exists():
                shutil.copytree(SAMPLE / task, project / "data" / task)
        version = snapshot(project)
        print(f"\n== data {name}: {version.short} ({', '.join(sorted(p.name for p in (project / 'data').iterdir()))})",
              flush=True)
        started = time.time()
        run_id = trigger(project, work.tracking_uri, launch, artifact_root=str(work.artifacts))
        if run_id is None:
            print("  already processed")
        else:
            _report(work.tracking_uri, run_id, time.time() - started)
    started = time.time()
    again = trigger(project, work.tracking_uri, launch, artifact_root=str(work.artifacts))
    print(f"\n== trigger with no data change: {'no run' if again is None else again} ({time.time() - started:.1f}s)")
    champion = registry.alias_version(work.tracking_uri, settings.model_name, registry.CHAMPION)
    previous = registry.alias_version(work.tracking_uri, settings.model_name, registry.PREVIOUS)
    print(f"\nregistered model '{settings.model_name}': champion = version {champion}, previous-champion = {previous}")
    print(f"review the runs:  .venv/bin/mlflow ui --backend-store-uri {work.tracking_uri}")


def _tracking(args) -> tuple[str, "Workdir"]:
    """The MLflow URI: --tracking-uri, or the registry of an existing embedded --workdir."""
    from .launcher import Workdir

    workdir = Workdir(Path(args.workdir))
    if args.tracking_uri:
        return args.tracking_uri, workdir
    if args.command in ("status", "rollback") and not (workdir.root / "mlflow.db").is_file():
        raise ValueError(f"{workdir.root}: no registry here (mlflow.db); pass the --workdir of your runs or --tracking-uri")
    return workdir.tracking_uri, workdir


def _trigger(args) -> None:
    from moecl.mlops.lifecycle import Policy
    from moecl.mlops.trigger import trigger, watch

    from moecl.mlops.steps import Refused

    from .launcher import KubeflowRuns, PipelineSettings, run_embedded, submit

    settings = PipelineSettings.load(args.settings) if args.settings else PipelineSettings.load()
    tracking_uri, workdir = _tracking(args)
    cluster = None
    if args.host:
        if args.image:
            raise ValueError("--image is for embedded runs; a cluster's steps run the image in infra/cluster.yaml")
        cluster = KubeflowRuns(args.host)

        def launch(version, run_id):
            submit(version, settings, args.host, tracking_uri, run_id, client=cluster.client)
        artifact_root = None
    else:
        if args.tracking_uri:
            raise ValueError("--tracking-uri is for --host runs; embedded runs keep MLflow in --workdir")
        containers = _containers(args.image)

        def launch(version, run_id):
            run_embedded(version, settings, workdir, run_id, args.verbose, containers)
        artifact_root = str(workdir.artifacts)
    policy = Policy(args.lease_seconds, args.max_attempts, args.backoff_seconds)
    if args.command == "watch":
        watch(args.project, tracking_uri, launch, args.interval, args.polls, policy, artifact_root, cluster,
              verdicts=(Refused,))
        return
    run_id = trigger(args.project, tracking_uri, launch, policy, artifact_root, rerun=args.rerun, cluster=cluster)
    print("nothing to launch" if run_id is None else f"pipeline run launched: MLflow run {run_id}")


def _status(args) -> None:
    from moecl.mlops import lifecycle, registry

    tracking_uri, _ = _tracking(args)
    policy = lifecycle.Policy(args.lease_seconds, args.max_attempts, args.backoff_seconds)
    print(f"model '{args.model_name}': champion = version {registry.alias_version(tracking_uri, args.model_name, registry.CHAMPION)}, "
          f"previous-champion = version {registry.alias_version(tracking_uri, args.model_name, registry.PREVIOUS)}")
    print("\ndata version   state       attempts  run                               detail")
    for state in lifecycle.version_states(tracking_uri, policy).values():
        print(f"{state.version[:12]:14} {state.state:11} {state.attempts:8}  {state.run_id or '-':33} {state.detail}")
    decision = registry.last_decision(tracking_uri, args.model_name)
    if decision:
        print(f"\nlast gate decision: version {decision['version']} {decision['promotion']}"
              + (f": {decision['reasons']}" if decision.get("reasons") else ""))


def _rollback(args) -> None:
    from moecl.mlops.registry import rollback

    tracking_uri, _ = _tracking(args)
    demoted, restored = rollback(tracking_uri, args.model_name, to=args.to, reason=args.reason)
    print(f"champion: version {demoted} -> version {restored}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    root.add_argument("--verbose", action="store_true", help="every library's logs, not only moecl's")
    commands = root.add_subparsers(dest="command", required=True)
    comp = commands.add_parser("compile", help="write the pipeline YAML for a Kubeflow cluster")
    comp.add_argument("--out", type=Path, default=COMPILED)
    run = commands.add_parser("demo", help="run the pipeline embedded on the shipped sample (v1, v2, v3)")
    run.add_argument("--workdir", type=Path, default=Path("work/demo"))
    run.add_argument("--settings", type=Path, help="pipeline settings (default: pipelines/settings.yaml)")
    run.add_argument("--image", help=IMAGE_HELP)
    for name, text in (("trigger", "launch one pipeline run if the version in data.dvc is due"),
                       ("watch", "poll data.dvc and launch runs as versions come due"),
                       ("status", "champion, the data versions seen and their state, the last gate decision"),
                       ("rollback", "move `champion` back")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("--workdir", default="work", help="embedded runs: MLflow sqlite, artifacts, KFP outputs")
        cmd.add_argument("--tracking-uri", help="MLflow tracking server (cluster runs)")
        cmd.add_argument("--model-name", default="moecl")
        if name in ("trigger", "watch", "status"):
            cmd.add_argument("--lease-seconds", type=float, default=900.0, help="a run silent this long is failed")
            cmd.add_argument("--max-attempts", type=int, default=3, help="failed runs before a version stays failed")
            cmd.add_argument("--backoff-seconds", type=float, default=300.0, help="wait before the first retry (doubles)")
        if name in ("trigger", "watch"):
            cmd.add_argument("--project", default=".", help="DVC project whose data.dvc tracks data/ (default: .)")
            cmd.add_argument("--settings", help="pipeline settings YAML (default: pipelines/settings.yaml)")
            cmd.add_argument("--host", help="submit to this Kubeflow Pipelines host instead of running embedded")
            cmd.add_argument("--image", help=IMAGE_HELP)
        if name == "trigger":
            cmd.add_argument("--rerun", metavar="VERSION", help="launch this data version (full hash) again")
        if name == "watch":
            cmd.add_argument("--interval", type=float, default=60.0, help="seconds between polls")
            cmd.add_argument("--polls", type=int, help="stop after this many polls (default: never)")
        if name == "rollback":
            cmd.add_argument("--to", metavar="VERSION", help="this registered version (default: previous-champion)")
            cmd.add_argument("--reason", default="", help="recorded on the alias move")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("moecl").setLevel(logging.INFO)  # third-party libraries: warnings only, unless --verbose
    if not args.verbose:
        for name in ("mlflow", "dvc"):  # they set their own loggers to INFO on import
            logging.getLogger(name).setLevel(logging.WARNING)
        # The display names are for the cluster's UI; the local runner says it ignores them, every run.
        warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner.*")
    if getattr(args, "image", None):  # the components name their image when first imported
        os.environ["MOECL_IMAGE"] = args.image
    handlers = {"trigger": _trigger, "watch": _trigger, "status": _status, "rollback": _rollback}
    from moecl.mlops.steps import Refused

    try:
        if args.command == "compile":
            print(compile_pipeline(args.out))
        elif args.command == "demo":
            demo(args.workdir, args.settings, args.verbose, args.image)
        else:
            handlers[args.command](args)
    except ValueError as err:
        print(f"moecl-pipeline: error: {err}", file=sys.stderr)
        return 2
    except Refused as refusal:
        print(f"moecl-pipeline: {refusal}", file=sys.stderr)
        for line in refusal.violations[:SHOWN_VIOLATIONS]:
            print(f"  {line}", file=sys.stderr)
        if len(refusal.violations) > SHOWN_VIOLATIONS:
            print(f"  ... and {len(refusal.violations) - SHOWN_VIOLATIONS} more (moecl-pipeline status; the run's "
                  f"validation report in MLflow)", file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
