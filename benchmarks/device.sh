#!/bin/bash
# The one prepared run for a lent GPU machine (DEVELOPERS.md: 15 minutes of device time in all).
# It times one MoE-CL training step against peft LoRA on random-init Llama shapes of 1B and 7B
# parameters, bf16 with gradient checkpointing (benchmarks/speed.py), and writes
# benchmarks/results/speed-gpu.json naming the device. The device machine has no pretrained weights
# and no network: SmolLM2's tokenizer travels in device-carry/ (an ignored folder).
#
#   here:   bash benchmarks/device.sh --prepare
#   there:  run(command="bash benchmarks/device.sh", carry=["device-carry"], timeout_s=480)
#   here:   copy the returned speed-gpu.json into benchmarks/results/
set -euo pipefail
CARRY=device-carry
if [ "${1:-}" = "--prepare" ]; then
  source=$(.venv/bin/python -c "from moecl.backbone import TINY_LLAMA, backbone_path; print(backbone_path(TINY_LLAMA))")
  rm -rf "$CARRY" && mkdir -p "$CARRY/tokenizer"
  cp "$source"/tokenizer* "$CARRY/tokenizer/"
  du -sh "$CARRY"
  exit 0
fi
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD MOECL_CACHE=$PWD/$CARRY/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
for shape in llama-1b llama-7b; do
  # A shape that fails (out of memory, a timeout) leaves the other's result and says why.
  timeout 210 python benchmarks/speed.py --shape "$shape" --device cuda --precision bf16 --gradient-checkpointing \
    --steps 8 --tokenizer "$CARRY/tokenizer" --out "$out/speed-gpu-$shape.json" || echo "$shape: exit $?"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = [json.loads(p.read_text()) for p in sorted(out.glob("speed-gpu-llama-*.json"))]
(out / "speed-gpu.json").write_text(json.dumps({"device": runs[0]["device"] if runs else None, "runs": runs}, indent=2))
print(f"speed-gpu.json: {len(runs)} shapes on {runs[0]['device'] if runs else 'nothing'}")
PY
