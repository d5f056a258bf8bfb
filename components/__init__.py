"""Thin KFP v2 components: typed wrappers over `moecl.mlops.steps`, one per pipeline step.

They run in the image that `infra/Dockerfile` builds (moecl and kfp installed), so no package is
installed at run time; the embedded runner uses the current environment instead.
"""
import os
from pathlib import Path

import yaml

CLUSTER_SETTINGS = Path(os.environ.get("MOECL_CLUSTER_SETTINGS",
                                       Path(__file__).resolve().parents[1] / "infra" / "cluster.yaml"))
IMAGE = yaml.safe_load(CLUSTER_SETTINGS.read_text())["image"]
