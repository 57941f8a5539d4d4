"""How long the quantization sweep takes: the default grid (or --grid full) on the default model (or a model path).

    .venv/bin/python benchmarks/bench_quant.py                      # default model, default grid, CPU
    .venv/bin/python benchmarks/bench_quant.py --device cuda        # the same on a GPU
    .venv/bin/python benchmarks/bench_quant.py --grid full --model path/or/hub-id

    .venv/bin/python benchmarks/bench_quant.py --quick              # every 5th setting: checks the script

Scans the model once (no verification, not timed), then times the sweep: one float perplexity pass plus one pass per
setting, every setting's weights restored after it. Prints the per-setting seconds, the time split by kind of setting
(RTN, GGUF, activations; the rest is the float pass and the set-up), and a Markdown line for the README with the
ratio to the 3-minute target.
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
    parser.add_argument("--quick", action="store_true", help="every 5th setting of the grid only")
    args = parser.parse_args()

    import torch

    import massact
    from massact.analysis.deploy.quant import DEFAULT_CLIP_Z, grid, sweep
    from massact.analysis.evaluation.perplexity import default_eval_text
    from massact.analysis.results import build_protect

    lm = massact.load(args.model, dtype=args.dtype, device=args.device, log=lambda message: None)
    report = massact.scan(lm)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    settings = grid(args.grid)[:: 5 if args.quick else 1]
    result = sweep(lm, build_protect(report), default_eval_text(), "shipped", args.grid, DEFAULT_CLIP_Z, settings=settings)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    for row in result.rows:
        print(f"{row.seconds:7.2f} s  {row.method:10s} {row.setting:32s} {row.variant:22s} ppl x{row.perplexity_ratio:,.2f}")
    device = (torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda"
              else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    kinds = {method: sum(r.seconds for r in result.rows if r.method == method) for method in ("rtn", "gguf", "activation")}
    print("| part | seconds | share |")
    print("|---|---|---|")
    for method, spent in kinds.items():
        print(f"| {method} settings | {spent:.1f} | {spent / seconds:.0%} |")
    rest = seconds - sum(kinds.values())
    print(f"| float pass and set-up | {rest:.1f} | {rest / seconds:.0%} |")
    print()
    print("| model | grid | settings | device | dtype | sweep seconds | per setting | x 180 s target | load average |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {lm.name} | {args.grid}{' (every 5th)' if args.quick else ''} | {len(settings)} | {device} | {args.dtype} | {seconds:.1f} | "
          f"{seconds / (len(result.rows) + 1):.2f} | {seconds / 180:.2f}x | {load:.1f} |")


if __name__ == "__main__":
    main()
