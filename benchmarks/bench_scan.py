"""Scan cost against plain forward passes and against the hand-written approach, and memory as the corpus grows.

    .venv/bin/python benchmarks/bench_scan.py            # default model and a tiny GPT-2, prints a Markdown table
    .venv/bin/python benchmarks/bench_scan.py --models moe --no-memory
        # a tiny mixture of experts (Qwen3-MoE: 4 blocks, 4 experts, top 2): the scan also keeps each expert's largest
        # |output| (super experts), running the experts through massact's own loop instead of transformers' default
    python3 benchmarks/bench_scan.py --device cuda --random-weights DIR
        # on a GPU machine that cannot hold the default model's file: its architecture (DIR holds its config.json and
        # tokenizer) with random weights, which cost the same to run; peak GPU memory is reported beside the RSS

Each measurement runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own. Three ways over
the same corpus, batched alike (batch 8):
  forward  plain forward passes, no hooks: the floor
  massact  massact's corpus pass: hooks on every block's output keep a top-k and a log-histogram, on device; the
           time inside massact's own code is reported beside it, as a share of the rest of the pass (the forward)
  naive    what researchers write by hand: hooks keep every site's full activations (all 9 sites, every block),
           statistics computed afterwards from the cache
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice


def corpus(multiple: int) -> Iterator[str]:
    """The evaluation text's sentences, ``multiple`` times over, produced one at a time (as a file is read)."""
    from massact.analysis.evaluation.perplexity import default_eval_text

    sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s+|\n+", default_eval_text()) if len(s.split()) >= 4]
    # A whole number of batches of 8: every copy of the corpus is then batched, and padded, exactly alike, so a larger
    # corpus repeats the same work and any growth in memory is the tool's, not a longer batch's.
    sentences = sentences[: len(sentences) // 8 * 8]
    for _ in range(multiple):
        yield from sentences


# Set from the command line; device and random weights are passed on to every subprocess.
OPTIONS = {"device": "cpu", "random_weights": None, "quick": False, "no_memory": False, "repeats": 2, "models": None}


def load(which: str):
    import massact

    if which == "default" and OPTIONS["random_weights"]:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = OPTIONS["random_weights"]
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).to(OPTIONS["device"])
        return massact.wrap(model, AutoTokenizer.from_pretrained(source), "SmolLM2-135M architecture, random weights")
    if which == "default":
        return massact.load(None, device=OPTIONS["device"], log=lambda m: None)
    sys.path.insert(0, "tests")
    from conftest import make_tokenizer, tiny_model

    tokenizer = make_tokenizer()
    family = {"tiny": "gpt2", "moe": "qwen3_moe"}[which]
    return massact.wrap(tiny_model(family, len(tokenizer)).to(OPTIONS["device"]), tokenizer)


def one(mode: str, which: str, multiple: int) -> dict:
    import torch

    from massact.analysis.detect.scan import scan_layers
    from massact.capture.batches import pad_batch
    from massact.capture.hooks import tap

    torch.set_num_threads(2)
    lm = load(which)
    limit = getattr(lm.model.config, "max_position_embeddings", 1024)
    # The tiny model's context is 64 tokens: long sentences are cut to it (the same cut for all three ways).
    # Token ids are made lazily, as massact makes them from a file, so no way keeps the corpus in memory.
    counted = {"texts": 0, "tokens": 0}

    def inputs() -> Iterator[torch.Tensor]:
        for text in corpus(multiple):
            ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :limit]
            counted["texts"] += 1
            counted["tokens"] += ids.shape[1]
            yield ids

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = inputs()
        while group := list(islice(stream, 8)):
            ids, mask = pad_batch(group)
            yield ids.to(lm.device), mask.to(lm.device)

    start = time.perf_counter()
    with torch.no_grad():
        if mode == "forward":
            for ids, mask in batches():
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        elif mode == "massact":
            with _timed_recorder() as hooks:
                scan_layers(lm, inputs(), candidates=512, batch_size=8)
        else:
            cache: dict = {}
            n_layers = len(lm.adapter.blocks(lm.model))
            sites = [(layer, site) for layer in range(n_layers) for site in lm.adapter.sites]
            with tap(lm.model, lm.adapter, sites, lambda layer, s, t: cache.setdefault((layer, s), []).append(t.detach().clone())):
                for ids, mask in batches():
                    lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer in range(n_layers):  # the statistics massact keeps, from the full cache (pads included: naive)
                values = torch.cat([t.flatten() for t in cache[layer, "resid_out"]]).abs()
                values.topk(512)
                values.median()
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() / 2**20 if lm.device.type == "cuda" else 0.0
    in_hooks = hooks["seconds"] if mode == "massact" else 0.0
    return {"seconds": seconds, "hook_seconds": in_hooks, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gpu_mb": gpu, **counted}


@contextmanager
def _timed_recorder() -> Iterator[dict]:
    """Time spent in massact's own scan code (BlockRecorder.add from the hooks, .finish after each batch): its share
    of the pass does not drift with the machine's speed, as two separate runs' ratio does. On a GPU the device is
    synchronised around each call, so the share there is an upper bound."""
    import torch

    from massact.capture.blocks import BlockRecorder

    spent = {"seconds": 0.0, "depth": 0}
    originals = {name: getattr(BlockRecorder, name) for name in ("add", "finish")}

    def timed(method):
        def run(self, *args):
            if spent["depth"]:  # add calls finish when a group is full: that time is already add's
                return method(self, *args)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            spent["depth"] += 1
            try:
                method(self, *args)
            finally:
                spent["depth"] -= 1
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            spent["seconds"] += time.perf_counter() - start
        return run

    for name, method in originals.items():
        setattr(BlockRecorder, name, timed(method))
    try:
        yield spent
    finally:
        for name, method in originals.items():
            setattr(BlockRecorder, name, method)


def measure(mode: str, which: str, multiple: int) -> dict:
    options = ["--device", OPTIONS["device"]] + (["--random-weights", OPTIONS["random_weights"]] if OPTIONS["random_weights"] else [])
    command = [sys.executable, __file__, "--one", mode, which, str(multiple), *options]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    models = OPTIONS["models"] or (("tiny",) if OPTIONS["quick"] else ("tiny", "default"))
    for which in models:
        # Interleaved repeats, the fastest of each kept: on a shared machine the load changes during a run.
        repeats = [{mode: measure(mode, which, 1 if OPTIONS["quick"] else 4) for mode in ("forward", "massact", "naive")}
                   for _ in range(1 if OPTIONS["quick"] else OPTIONS["repeats"])]
        base = {mode: min((r[mode] for r in repeats), key=lambda m: m["seconds"]) for mode in repeats[0]}
        floor = base["forward"]["seconds"]
        for mode, result in base.items():
            hooks = result["hook_seconds"]
            share = f"{hooks:.2f} s, {hooks / (result['seconds'] - hooks) * 100:.1f}% of the rest" if hooks else "-"
            rows.append(f"| {which} | {mode} | {result['texts']} | {result['tokens']} | {result['seconds']:.2f} | "
                        f"{result['seconds'] / floor:.2f}x | {share} | {result['rss_mb']:.0f} | {result['gpu_mb']:.0f} |")
    print(f"device: {OPTIONS['device']}" + (", default model's architecture with random weights" if OPTIONS["random_weights"] else ""))
    print("| model | way | texts | tokens | seconds | x plain forward | in massact's scan code | peak RSS MiB | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if OPTIONS["no_memory"]:
        return
    print()
    print("| model | corpus | texts | massact seconds | massact peak RSS MiB | massact peak GPU MiB | naive peak RSS MiB | "
          "naive peak GPU MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for which in models:
        for multiple in ((1, 4) if OPTIONS["quick"] else (1, 4, 16)):
            ours = measure("massact", which, multiple)
            # The naive cache of the default model takes about 4 GiB per 1x of this corpus: 16x would not fit in 24 GiB.
            naive = measure("naive", which, multiple) if which == "tiny" or multiple < 16 else None
            cells = f"{naive['rss_mb']:.0f} | {naive['gpu_mb']:.0f}" if naive else "not run (out of memory) | -"
            print(f"| {which} | {multiple}x | {ours['texts']} | {ours['seconds']:.2f} | {ours['rss_mb']:.0f} | {ours['gpu_mb']:.0f} | "
                  f"{cells} |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=3, metavar=("MODE", "MODEL", "MULTIPLE"), help="one measurement (run by main)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", help="a directory with the default model's config.json and tokenizer")
    parser.add_argument("--quick", action="store_true", help="the tiny model only, one repeat: checks the script")
    parser.add_argument("--no-memory", action="store_true", help="the speed table only, not the corpus-size memory rows")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each way, the fastest kept (default 2)")
    parser.add_argument("--models", help="comma-separated, of tiny (a tiny GPT-2), moe (a tiny Qwen3-MoE), default")
    args = parser.parse_args()
    OPTIONS.update(device=args.device, random_weights=args.random_weights, quick=args.quick, no_memory=args.no_memory,
                   repeats=args.repeats, models=tuple(args.models.split(",")) if args.models else None)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]))))
    else:
        main()
