"""How long the quantization sweep takes: the default grid (or --grid full) on the default model (or a model path).

    .venv/bin/python benchmarks/bench_quant.py                      # default model, default grid, CPU
    .venv/bin/python benchmarks/bench_quant.py --device cuda        # the same on a GPU
    .venv/bin/python benchmarks/bench_quant.py --grid full --model path/or/hub-id

Scans the model once (no verification, not timed), then times the sweep: one float perplexity pass plus one pass per
setting, every setting's weights restored after it. Prints the per-setting seconds and a Markdown line for the README.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model as for massact scan (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--grid", default="default", help="default or full")
    args = parser.parse_args()

    import torch

    import massact
    from massact.analysis.deploy import protect
    from massact.analysis.deploy.quant import grid, measure

    lm = massact.load(args.model, dtype=args.dtype, device=args.device, log=lambda message: None)
    report = massact.scan(lm)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = measure(lm, protect.build(report), grid_name=args.grid)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    for row in result.rows:
        print(f"{row.seconds:7.2f} s  {row.method:10s} {row.setting:32s} {row.variant:22s} ppl x{row.perplexity_ratio:,.2f}")
    device = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("| model | grid | settings | device | dtype | sweep seconds | per setting | load average |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {lm.name} | {args.grid} | {len(grid(args.grid))} | {device} | {args.dtype} | {seconds:.1f} | "
          f"{seconds / (len(result.rows) + 1):.2f} | {load:.1f} |")


if __name__ == "__main__":
    main()
