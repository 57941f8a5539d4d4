"""How long the full report takes (scan, mechanism, trigger, verification, sinks, super weights), split by stage.

    .venv/bin/python benchmarks/bench_report.py            # the default model with verification, model cached
    .venv/bin/python benchmarks/bench_report.py --quick    # a tiny planted GPT-2: checks the script, not the target
    .venv/bin/python benchmarks/bench_report.py --out DIR  # also write DIR/report.json (for compare_reports.py)

Loads the model (timed apart), then times one `massact.scan(..., verify=True)` with every stage function of
massact.pipeline wrapped by a timer, and prints a Markdown table: seconds per stage, share of the total, and the
total against the 30 s target of issue 19. Stages nest (the interventions run inside the causal stage): the
table lists the inner ones indented under their stage.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

TARGET = 30.0  # seconds, issue 19
# (module attribute in massact.pipeline, label, depth): the stages, then the steps inside them worth seeing.
TIMED = [
    ("detect_stage", "corpus scan and detection", 0),
    ("mechanism_stage", "lifelines, origin, anatomy, attribution", 0),
    ("trigger_stage", "trigger (split, chain, carriers, patching)", 0),
    ("causal_stage", "causal stage", 0),
    ("evaluation_for", "evaluation windows, unmodified pass", 1),
    ("verify_report", "interventions, output effects, input dependence", 1),
    ("sink_analysis", "attention sinks", 1),
    ("all_super_weights", "super weights, one after another", 1),
    ("deploy_stage", "precision headroom", 0),
]


def timed(seconds: dict[str, float], name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny planted GPT-2 instead of the default model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, this machine's cores)")
    parser.add_argument("--out", type=Path, help="write report.json there too")
    args = parser.parse_args()

    import torch

    import massact
    from massact import pipeline

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import make_tokenizer, plant_mlp, tiny_model

        tokenizer = make_tokenizer()
        model = tiny_model("gpt2", len(tokenizer))
        plant_mlp(model, tokenizer.bos_token_id, 1, 37, 20)
        lm, texts, eval_text = massact.wrap(model, tokenizer), ["The library opens at nine.", "Summer is warm."], " ".join(["She poured the tea."] * 20)
    else:
        lm, texts, eval_text = massact.load(None, device="cpu", log=lambda m: None), None, None
    load = time.perf_counter() - started

    seconds: dict[str, float] = {}
    for name, _, _ in TIMED:
        setattr(pipeline, name, timed(seconds, name, getattr(pipeline, name)))
    started = time.perf_counter()
    report = massact.scan(lm, texts, verify=True, eval_text=eval_text)
    total = time.perf_counter() - started
    if args.out:
        from massact.report.files import write_report

        write_report(report, args.out, {"json"})

    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: {lm.name}; load {load:.1f} s (not counted); {args.threads} torch threads; load average {load_average:.1f}")
    print("| stage | seconds | share |")
    print("|---|---|---|")
    for name, label, depth in TIMED:
        if name in seconds:
            print(f"| {'&nbsp;&nbsp;' * depth}{label} | {seconds[name]:.1f} | {seconds[name] / total:.0%} |")
    print(f"| **total** | **{total:.1f}** | {total / TARGET:.2f}x the {TARGET:.0f} s target |")


if __name__ == "__main__":
    main()
