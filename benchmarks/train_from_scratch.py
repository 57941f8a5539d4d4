"""Section 6 of the track: train a small Llama from scratch on this CPU for a few minutes, with the training monitor
and saved checkpoints, then run ``massact track`` on them. Everything is offline.

    nice -n 10 .venv/bin/python benchmarks/train_from_scratch.py --out runs/scratch --minutes 7

Data: the Python documentation that every CPython ships (``pydoc_data.topics``, about 465,000 characters, PSF
licence), cut into 64-token windows that each start with <s>. Tokenizer: a byte-level BPE of 1,024 tokens trained on
that text. Model: LlamaConfig, 4 blocks, d_model 128, d_mlp 512, 4 heads, tied embeddings (1,180,800
parameters: small enough for hundreds of steps in minutes on a shared CPU). AdamW, learning rate 3e-3 after 50
warm-up steps, batch 8. The monitor scans the built-in sentences every ``--every`` steps;
a checkpoint is saved every ``--save-seconds`` seconds of training and at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

WINDOW, VOCAB, BATCH = 64, 1024, 8


def documentation() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text.split("\n\n"), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
                                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def windows(tokenizer, text: str) -> list[dict]:
    """The text as consecutive windows of WINDOW tokens, each starting with <s> (as every probe text does)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    step = WINDOW - 1
    return [{"input_ids": [tokenizer.bos_token_id, *ids[start:start + step]]} for start in range(0, len(ids) - step, step)]


def model_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=WINDOW, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                       tie_word_embeddings=True)


class TimeBudget:
    """Save a checkpoint every ``every`` seconds of training, and stop (saving) after ``budget`` seconds."""

    def __init__(self, budget: float, every: float):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.start = outer.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if now - outer.last >= every:
                    control.should_save, outer.last = True, now
                if now - outer.start >= budget:
                    control.should_save = control.should_training_stop = True

        self.callback = Callback()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scratch"))
    parser.add_argument("--minutes", type=float, default=7.0, help="training time budget")
    parser.add_argument("--save-seconds", type=float, default=40.0, help="seconds of training between checkpoints")
    parser.add_argument("--every", type=int, default=20, help="steps between two monitor measurements")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared CPU, 1 avoids threads waiting on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM, Trainer, TrainingArguments

    from massact.track.monitor import MassactCallback

    torch.manual_seed(0)
    text = documentation()
    tokenizer = train_tokenizer(text)
    data = windows(tokenizer, text)
    model = LlamaForCausalLM(model_config(len(tokenizer)))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(data)} windows of {WINDOW} tokens", flush=True)
    training = TrainingArguments(output_dir=str(args.out / "checkpoints"), max_steps=100_000, per_device_train_batch_size=BATCH,
                                 learning_rate=3e-3, warmup_steps=50, lr_scheduler_type="constant_with_warmup", weight_decay=0.01,
                                 logging_steps=args.every, save_strategy="no", report_to=[], use_cpu=True, save_only_model=True,
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[TimeBudget(args.minutes * 60, args.save_seconds).callback])
    (args.out / "monitor.jsonl").unlink(missing_ok=True)
    monitor = MassactCallback.attach(trainer, every=args.every, path=args.out / "monitor.jsonl")
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"trained {trainer.state.global_step} steps in {seconds:.0f} s; loss {losses[0]:.2f} -> {losses[-1]:.2f}; "
          f"{len(monitor.records)} monitor records", flush=True)
    for spec, out, extra in ((args.out / "monitor.jsonl", args.out / "monitor-track", []),
                             (args.out / "checkpoints", args.out / "track", ["--verify"])):
        subprocess.run([sys.executable, "-m", "massact", "track", str(spec), "--out", str(out), *extra], check=True)


if __name__ == "__main__":
    main()
