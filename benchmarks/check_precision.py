"""The scan in float32, bfloat16 and float16, padded and unpadded, on a device (a GPU where one is lent): planted tiny
models of a dense family (Llama: a neuron writes dim 20 on the first token) and of a mixture of experts (Qwen3-MoE:
an expert's neuron does), every stage of ``massact.scan`` with verification in bfloat16, and the massive dims, birth
blocks and values each format gives against float32's. tests/test_precision.py checks the same on the CPU.

    .venv/bin/python benchmarks/check_precision.py                 # on the CPU
    python3 benchmarks/check_precision.py --device cuda             # on a GPU machine (PYTHONPATH=src:tests)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, "tests")

DTYPES = ("float32", "bfloat16", "float16")


def planted(family: str, tokenizer):
    from conftest import plant_mlp, tiny_model
    from test_families import planted_moe

    if family == "qwen3_moe":
        return planted_moe(family, tokenizer)
    model = tiny_model(family, len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, 1, 37, 20)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import massact
    from conftest import make_tokenizer
    from massact.analysis.detect.scan import scan_layers
    from massact.settings import Criterion
    from massact.texts import DEFAULT_TEXTS

    tokenizer = make_tokenizer()
    texts = list(DEFAULT_TEXTS) * 4
    windows = [tokenizer(text, return_tensors="pt").input_ids for text in texts]
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), torch {torch.__version__}")
    print("| model | dtype | batches | seconds | massive dims (born at) | largest massive value | gap to float32 (eps) |")
    print("|---|---|---|---|---|---|---|")
    criterion = Criterion()
    for family in ("llama", "qwen3_moe"):
        reference = None
        for dtype in DTYPES:
            model = planted(family, tokenizer).to(args.device, getattr(torch, dtype))
            lm = massact.wrap(model, tokenizer)
            for batch in (8, 1):
                start = time.perf_counter()
                scan = scan_layers(lm, iter(windows), 512, batch_size=batch)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                medians = scan.medians()
                massive = {}
                for layer, (median, top) in enumerate(zip(medians, scan.tops)):
                    for value, (_, _, dim) in top.items():
                        if criterion.is_massive(value, median):
                            massive.setdefault(dim, (layer, value))
                            if abs(value) > abs(massive[dim][1]):
                                massive[dim] = (massive[dim][0], value)
                largest = max((v for _, v in massive.values()), key=abs, default=float("nan"))
                reference = reference or largest
                gap = abs(largest - reference) / abs(reference) / torch.finfo(getattr(torch, dtype)).eps
                dims = ", ".join(f"{d} ({born})" for d, (born, _) in sorted(massive.items()))
                print(f"| {family} | {dtype} | {'padded, 8' if batch == 8 else 'one text'} | {seconds:.2f} | {dims} | {largest:+,.1f} | "
                      f"{gap:.2f} |")
    model = planted("llama", tokenizer).to(args.device, torch.bfloat16)
    start = time.perf_counter()
    report = massact.scan(model, texts[:5], tokenizer=tokenizer, verify=True, quant=True, eval_text=" ".join(texts))
    print(f"\nbfloat16 on {args.device}, every stage (verify, sinks, quantization): {time.perf_counter() - start:.1f} s; "
          f"dims {[d.dim for d in report.findings.dims]}, born at {[d.born_at for d in report.findings.dims]}, top neuron "
          f"{report.mechanism.attribution[0].neurons[0].neuron}, super weight [{report.mechanism.attribution[0].super_weight.row}, "
          f"{report.mechanism.attribution[0].super_weight.col}], verification "
          f"{[(r.name, r.confirms) for r in report.causal.verification.interventions][:3]}")


if __name__ == "__main__":
    main()
