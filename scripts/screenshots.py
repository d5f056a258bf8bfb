"""Screenshots of the MLflow UI for a pipeline workdir (the demo's, by default), as a data scientist
and a release owner see it: the runs, the champion's run (params, dataset input, description), its
per-step curves, its accuracy heatmap, the registered model with its aliases, the champion's model
card and the newest candidate's.

Starts `mlflow server` on the workdir's store on loopback and drives headless Chromium with
Playwright. Needs `pip install -e '.[docs]'` and a Chromium binary (Debian: `apt-get install
chromium`); nothing is downloaded at run time.

    python scripts/screenshots.py --workdir runs/demo --out docs
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from moecl.mlops import registry
from moecl.mlops.loopback import start_mlflow, stop

# Chromium on a machine with a closed network: no background connections, no sandbox as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def pages(tracking_uri: str, model_name: str) -> dict[str, tuple[str, str | None]]:
    """Screenshot name -> (UI route (hash routing), text for the page's chart filter), for the
    champion's run and model version."""
    client = registry.connect(tracking_uri)
    version = registry.alias_version(tracking_uri, model_name, registry.CHAMPION)
    if version is None:
        raise SystemExit(f"{tracking_uri}: no champion of '{model_name}' to show")
    run_id = client.get_model_version(model_name, version).run_id
    experiment = client.get_run(run_id).info.experiment_id
    run = f"#/experiments/{experiment}/runs/{run_id}"
    shots = {
        "1-runs": (f"#/experiments/{experiment}/runs", None),
        "2-champion-run": (run, None),
        "3-champion-curves": (f"{run}/model-metrics", "train."),  # the per-step training curves
        "4-champion-heatmap": (f"{run}/artifacts/evaluation/accuracy_matrix.png", None),
        "5-registered-model": (f"#/models/{model_name}", None),
        "6-model-card": (f"#/models/{model_name}/versions/{version}", None),
    }
    latest = max((int(v.version) for v in client.search_model_versions(f"name='{model_name}'")))
    if str(latest) != version:  # the newest candidate, e.g. one the gate rejected, with its reasons
        shots[f"7-model-card-v{latest}"] = (f"#/models/{model_name}/versions/{latest}", None)
    return shots


def _tidy(page) -> None:
    """The classic (model training) view, without the assistant's side panel."""
    for control in (page.get_by_role("button", name="Close"), page.get_by_text("Model training", exact=True)):
        if control.count():
            control.first.click()
            page.wait_for_timeout(500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--model-name", default="moecl")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds a page gets to draw its charts")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    tracking_uri = f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
    routes = pages(tracking_uri, args.model_name)
    args.out.mkdir(parents=True, exist_ok=True)
    server, url = start_mlflow(["server", "--backend-store-uri", tracking_uri, "--workers", "1"],
                               args.workdir / "mlflow-ui.log", "/health", timeout=120)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            for name, (route, charts) in routes.items():
                page.goto(f"{url}/{route}", wait_until="load", timeout=90_000)
                page.wait_for_timeout(args.settle * 1000)
                _tidy(page)
                if charts:
                    page.get_by_placeholder("Search metric charts").fill(charts)
                page.wait_for_timeout(args.settle * 1000)
                page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
                print(f"{args.out / f'{name}.png'}: {route}")
            browser.close()
    finally:
        stop(server)


if __name__ == "__main__":
    main()
