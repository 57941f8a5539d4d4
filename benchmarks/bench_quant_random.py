"""Usage: python3 benchmarks/bench_quant_random.py DIR default full

The quantization sweep timed on a GPU with the default model's architecture (random weights, which cost the same
to run) and the default model's own protect.json (its super weights and massive dims), since the model's file cannot
travel to the GPU machine."""
import sys
import time
from pathlib import Path

sys.path.insert(0, "src")  # run from the repository root: the GPU machine has no install of massact
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import massact
from massact.analysis.deploy.quant import measure_quantization
from massact.report.schema import load_protect
from massact.settings import ScanSettings

source = sys.argv[1]  # a directory with the default model's config.json, tokenizer and a protect.json of it
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).to("cuda").eval()
lm = massact.wrap(model, AutoTokenizer.from_pretrained(source), "SmolLM2-135M architecture, random weights")
lm.source = "random-weights"
plan = load_protect(Path(source) / "protect.json")
for name in sys.argv[2:]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = measure_quantization(lm, plan, None, ScanSettings(quant_grid=name))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for row in result.rows:
        print(f"{row.seconds:7.2f} s  {row.method:10s} {row.setting:32s} {row.variant}")
    print(f"grid {name}: {len(result.rows)} settings in {seconds:.1f} s on {torch.cuda.get_device_name()} (float32)")
