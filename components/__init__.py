"""Thin KFP v2 components: typed wrappers over `moecl.mlops.steps`, one per pipeline step.

They run in the image that `infra/Dockerfile` builds (moecl and kfp installed), so no package is
installed at run time; the embedded runner uses the current environment instead.
"""
import os
from pathlib import Path

import yaml

from pipelines import shipped

# infra/cluster.yaml, which an installed package carries too; MOECL_CLUSTER_SETTINGS names another file.
CLUSTER_SETTINGS = Path(os.environ.get("MOECL_CLUSTER_SETTINGS") or shipped("infra") / "cluster.yaml")
# The image every step runs in: the cluster's, or MOECL_IMAGE (a local build, scripts/test-containers.sh).
IMAGE = os.environ.get("MOECL_IMAGE") or yaml.safe_load(CLUSTER_SETTINGS.read_text())["image"]
