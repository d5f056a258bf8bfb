"""The two CPU kernel costs behind experts.py's choices, at one SmolLM2 FFN's shapes (8 x 128 tokens,
1536 wide, r=8): a dropout mask drawn by bernoulli_ against uniforms compared with p, and B's
gradient formed as G^T z (what autograd does for a row-major B) against z^T G (column-major B).
Prints a markdown table, writes JSON.

    python benchmarks/lora_kernels.py [--repeats 30] [--out benchmarks/results/lora_kernels.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

TOKENS, WIDTH, RANK, P = 8 * 128, 1536, 8, 0.05


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.machine())


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 3):  # the first three warm up
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/lora_kernels.json")
    args = parser.parse_args()
    hidden = torch.randn(TOKENS, WIDTH)
    grad, z = torch.randn(TOKENS, WIDTH), torch.randn(TOKENS, RANK)
    pairs = {
        "dropout mask": {"bernoulli_": lambda: torch.empty_like(hidden).bernoulli_(1 - P),
                         "rand_like >= p": lambda: torch.rand_like(hidden) >= P},
        "B's gradient": {"G^T z": lambda: grad.T @ z, "z^T G": lambda: z.T @ grad},
    }
    rows = [{"kernel": kernel, "variant": name, "median_ms": median_ms(fn, args.repeats)}
            for kernel, variants in pairs.items() for name, fn in variants.items()]
    device = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"{device}; {TOKENS} tokens x {WIDTH}, r={RANK}, median of {args.repeats}\n")
    print("| kernel | variant | median (ms) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['kernel']} | {row['variant']} | {row['median_ms']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "tokens": TOKENS, "width": WIDTH, "rank": RANK, "p": P,
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
