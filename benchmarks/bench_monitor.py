"""What the training monitor costs: the probe scan's time against the training time it is spread over.

    nice -n 10 .venv/bin/python benchmarks/bench_monitor.py [--steps 200] [--every 100]

The model, data and optimizer of benchmarks/train_from_scratch.py (a 1.2M-parameter Llama, batch 8 x 64 tokens,
AdamW). One real Trainer run of ``--steps`` steps with ``MassactCallback`` attached at ``--every`` (default: the
monitor's default interval); the time inside the callback is measured around each of its calls, and the share is
that time over the whole run. A second run without the callback gives the plain training time beside it (on a
shared CPU the two runs' difference is noisier than the timed share).
"""

from __future__ import annotations

import argparse
import time

import torch


def run(steps: int, every: int | None) -> tuple[float, float, int]:
    """(seconds of training, seconds inside the monitor, monitor calls) for one Trainer run."""
    from train_from_scratch import BATCH, documentation, model_config, train_tokenizer, windows
    from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM, Trainer, TrainingArguments

    from massact.track.monitor import MassactCallback

    torch.manual_seed(0)
    text = documentation()
    tokenizer = train_tokenizer(text)
    args = TrainingArguments(output_dir="/tmp/massact-bench-monitor", max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=3e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10_000)
    trainer = Trainer(model=LlamaForCausalLM(model_config(len(tokenizer))), args=args, train_dataset=windows(tokenizer, text),
                      processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    inside = [0.0, 0]
    if every is not None:
        callback = MassactCallback.attach(trainer, every=every)
        measure = callback.monitor.measure

        def timed(model, step):
            start = time.perf_counter()
            try:
                return measure(model, step)
            finally:
                inside[0] += time.perf_counter() - start
                inside[1] += 1

        callback.monitor.measure = timed
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, inside[0], inside[1]


def main() -> None:
    from massact.track.monitor import EVERY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=EVERY)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (as in train_from_scratch.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total, inside, calls = run(args.steps, args.every)
    plain, _, _ = run(args.steps, None)
    print("| steps | every | monitor calls | s per call | training with monitor (s) | of it in the monitor | without monitor (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.steps} | {args.every} | {calls} | {inside / max(calls, 1):.3f} | {total:.1f} | {inside / total:.2%} | {plain:.1f} |")


if __name__ == "__main__":
    main()
