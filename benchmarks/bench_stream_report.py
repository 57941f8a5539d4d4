"""The full report of a model several times larger than the memory limit, read block by block: every section, and
the planted massive activation found, verified and quantized.

    .venv/bin/python benchmarks/bench_stream_report.py --dir /tmp/massact-report-600m   # 600MB under 150MB (the defaults)
    .venv/bin/python benchmarks/bench_stream_report.py --dir /tmp/massact-report-quick --quick   # checks the script

The model is ``bench_stream.py``'s Llama (random weights, float32, safetensors shards, ``--size`` of weights, a block
at most a sixth of ``--memory``), with one massive activation planted in each shard's tensors by name as they are
drawn (``Plant``), as the tests plant one (tests/conftest.py ``plant_mlp``): residual dim ``trigger`` carries 10 on <s>
alone (its column of the token embeddings is 0 but in the <s> row), no block writes it (its row of every o_proj and
down_proj is 0), and neuron ``neuron`` of block ``layer`` reads it alone (its gate_proj and up_proj rows are 0 but 2.0
at the trigger) and writes 100 x its activation into ``dim`` (down_proj[dim, neuron] = 100), which no other weight
writes: a massive ``dim`` on <s>, born in block ``layer`` through that neuron, whose super weight is
down_proj[dim, neuron], its value the same in every later block. Random weights have no massive queries or keys
either, so one rotary pair of block ``key_layer``'s keys is made 50 times larger in every key head, as
tests/test_streaming.py plants them, for the Q/K disruption test.

Then, in a fresh process as a user runs it, ``python -m massact scan DIR --memory LIMIT --verify --quant --eval-file
SHORT --format json --out OUT``: the weights exceed the limit, so the scan streams them. SHORT is the first
``--eval-chars`` characters of massact's shipped evaluation text (a short text keeps the verification and the sweep's
passes to minutes on a CPU). The checkpoint's files are dropped from the page cache first, so that the first read of
each block comes from the disk; the later passes' reads may come from the page cache where this machine has the
memory for it, which a machine of the limit's size would not. The run's wall clock, its CPU time (user + system,
all threads) and its peak resident memory are measured: its ru_maxrss from wait4, and the VmHWM read from /proc
while it ran. A child's ru_maxrss also counts what its parent held when it started it, so this process imports no
torch and builds the checkpoint in a child of its own. Beside it, the peak of a process that only imports what the
scan imports (torch, transformers, gguf, matplotlib, massact), which no weight limit can cover.

OUT/report.json is read back: the table gives, for each section of the report, whether it is there and its
headline; the script exits non-zero, naming what failed, where a section is missing or the planted truth is not
found (the dim, its birth block, the neuron, the super weight, verification confirming it, the trigger's neuron and
token, the Q/K test at the planted keys' block), or where the quantization's baseline perplexity is not
verification's (the same model, text and windows, scored in another pass).

Not run: ``massact quant OUT`` on the saved report. It streams the model only where its weights exceed the memory
available (/proc/meminfo), and it takes no ``--memory``, so on a machine with the memory for the model it runs in
memory; the scan's ``--quant`` above is the same sweep, streamed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench_stream import build, evict, machine, parse_size

BLOCK = re.compile(r"model\.layers\.(\d+)\.")
READS = re.compile(r"streamed model: the checkpoint was read ([0-9.e+]+) times \((.*)\)")
# What the scan process imports (its own modules and the libraries they load: gguf for the sweep's formats, matplotlib
# for the figures): the floor under any limit.
IMPORTS = ("import torch, transformers, safetensors, gguf; import transformers.models.llama.modeling_llama; "
           "import massact.cli, massact.pipeline, massact.models.quantized, massact.report.files, massact.report.plots")


@dataclass(frozen=True, kw_only=True)
class Plant:
    """One massive activation planted by the tensors' names in a Llama checkpoint, as tests/conftest.py's
    ``plant_mlp`` plants it in a model: ``dim`` becomes massive on <s> in block ``layer``, through neuron ``neuron``,
    whose super weight is down_proj[dim, neuron] = ``write``; and massive keys, as tests/test_streaming.py plants
    them, for the Q/K disruption test."""

    trigger: int = 5  # the residual dim <s> alone carries, at ``value``
    dim: int = 200
    layer: int = 1
    neuron: int = 700
    value: float = 10.0
    read: float = 2.0  # the neuron's gate and up weight on the trigger dim
    write: float = 100.0
    key_layer: int = 0
    key_pair: tuple[int, int] = (7, 39)  # a rotary pair of a 64-dim head (dims i and i + 32 turn together)
    key_scale: float = 50.0

    def words(self) -> str:
        """What is planted, in a sentence for the table."""
        return (f"dim {self.dim} on <s>, born in block {self.layer} through neuron {self.neuron} (down_proj[{self.dim}, "
                f"{self.neuron}] = {self.write:g}), which reads dim {self.trigger} (<s> alone carries {self.value:g}); "
                f"keys: the pair {self.key_pair} of every key head of block {self.key_layer} x{self.key_scale:g}")

    def __call__(self, tensors: dict, config) -> None:
        """Plant into a shard's ``tensors`` (name -> tensor, changed in place); ``config``: the model's LlamaConfig."""
        head_dim = config.hidden_size // config.num_attention_heads
        if not (self.trigger != self.dim and max(self.trigger, self.dim) < config.hidden_size
                and self.neuron < config.intermediate_size and max(self.layer, self.key_layer) < config.num_hidden_layers
                and self.key_pair[1] - self.key_pair[0] == head_dim // 2):
            raise ValueError(f"{self} does not fit the model (d_model {config.hidden_size}, d_mlp {config.intermediate_size}, "
                             f"{config.num_hidden_layers} blocks, heads of {head_dim})")
        for name, tensor in tensors.items():
            block = BLOCK.match(name)
            layer = int(block.group(1)) if block is not None else None
            if name == "model.embed_tokens.weight":  # <s> alone carries the trigger dim
                tensor[:, self.trigger] = 0.0
                tensor[config.bos_token_id, self.trigger] = self.value
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                # No block writes the trigger dim (it stays 10) nor, but for the neuron, the planted dim: its value is
                # the same from its birth on, so its peak is its birth block, and the trigger's passes stop there.
                tensor[[self.trigger, self.dim]] = 0.0
            if layer == self.layer and name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):  # it reads it alone
                tensor[self.neuron] = 0.0
                tensor[self.neuron, self.trigger] = self.read
            if layer == self.layer and name.endswith("mlp.down_proj.weight"):
                tensor[self.dim, self.neuron] = self.write
            if layer == self.key_layer and name.endswith("self_attn.k_proj.weight"):  # the pair in every key head
                rows = [head * head_dim + dim for head in range(config.num_key_value_heads) for dim in self.key_pair]
                tensor[rows] *= self.key_scale


def in_bytes(value: float) -> str:
    """A size in MB under a GB, else in GB (powers of 10, as --size and --memory take them)."""
    return f"{value / 1e6:.1f} MB" if value < 1e9 else f"{value / 1e9:.2f} GB"


def short_eval(out: Path, chars: int) -> Path:
    """The first ``chars`` characters of massact's shipped evaluation text (cut at a space), as a file in ``out``."""
    shipped = Path(importlib.util.find_spec("massact").origin).parent / "data" / "eval.txt"
    text = shipped.read_text()[:chars]
    path = out / "eval-short.txt"
    path.write_text(text[: text.rfind(" ")] if len(text) == chars else text)
    return path


MEMORY = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def _memory(pid: int) -> dict[str, int] | None:
    """Process ``pid``'s MEMORY fields of /proc/PID/status now, in bytes: its peak resident memory so far, its resident
    memory, and that split into anonymous memory and mapped files' pages (which the kernel can drop, and read again);
    None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status if line.split(":")[0] in MEMORY}
    except OSError:
        return None
    return fields if len(fields) == len(MEMORY) else None


def run(command: list[str], logs: Path, log) -> dict:
    """``command`` in a child process, its output in ``logs``.out and .err: its exit code, wall clock, CPU time (user
    + system, all threads) and peak resident memory, twice: its ru_maxrss from wait4, and the last VmHWM read from
    /proc while it ran (every 0.2 s); and the sample of the largest resident memory, split into
    anonymous memory and mapped files, with its time."""
    log("running: " + " ".join(command))
    largest: dict = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0, "seconds": 0.0}

    def poll(pid: int) -> None:
        while (sample := _memory(pid)) is not None:
            if sample["VmRSS"] > largest["VmRSS"]:
                largest.update(sample, seconds=time.perf_counter() - started)
            largest["VmHWM"] = max(largest["VmHWM"], sample["VmHWM"])
            time.sleep(0.2)

    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
        load, started = os.getloadavg()[0], time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err)
        watcher = threading.Thread(target=poll, args=(child.pid,), daemon=True)
        watcher.start()
        _, status, usage = os.wait4(child.pid, 0)  # wait4, not Popen.wait: the child's own resource usage
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    return {"rc": child.returncode, "stdout": Path(f"{logs}.out").read_text(), "stderr": Path(f"{logs}.err").read_text(),
            "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak": usage.ru_maxrss * 1024,
            "polled_peak": largest["VmHWM"], "largest": largest, "load": [load, os.getloadavg()[0]]}


def build_child(root: Path, size: str, memory: str, log) -> dict:
    """``bench_stream.build`` with the default ``Plant``, in a child process (``--one build``), so that this process,
    whose memory every child it starts inherits in its ru_maxrss, never holds a shard nor imports torch."""
    command = [sys.executable, __file__, "--one", "build", "--dir", str(root), "--size", size, "--memory", memory]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"building the checkpoint failed (exit {done.returncode})")
    built = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"checkpoint: {in_bytes(built['bytes'])} in {built['shards']} shards (built in {built['build_seconds']:.0f} s)")
    return built


def sections(report: dict, plant: Plant) -> tuple[list[tuple[str, bool, str]], list[str]]:
    """Each section of ``report`` (report.json, as read back) as (name, present, headline), and what is missing or
    not the planted truth, each in a line."""
    failed: list[str] = []

    def need(ok: bool, what: str) -> bool:
        if not ok:
            failed.append(what)
        return ok

    rows: list[tuple[str, bool, str]] = []

    def present(name: str, ok: bool, missing: str) -> bool:
        """Whether section ``name`` is there; where not, its row says ``missing``, and so does the failures' list."""
        if not need(ok, f"{name}: {missing}"):
            rows.append((name, False, missing))
        return ok

    findings, mechanism, causal, deploy = report["findings"], report["mechanism"], report["causal"], report["deploy"]
    matrix = f"model.layers.{plant.layer}.mlp.down_proj.weight"

    dims = findings["dims"]
    if present("detection", bool(dims), "no massive dim"):
        top = dims[0]
        need([d["dim"] for d in dims] == [plant.dim], f"detection: massive dims {[d['dim'] for d in dims]}, planted [{plant.dim}]")
        need(top["born_at"] == plant.layer, f"detection: dim {top['dim']} born at block {top['born_at']}, planted {plant.layer}")
        rows.append(("detection", True, f"massive dims {[d['dim'] for d in dims]} (planted [{plant.dim}]), born at block "
                                       f"{top['born_at']} (planted {plant.layer}), largest value {top['max_value']:,.0f}, "
                                       f"{len(findings['massive'])} massive entries"))

    attribution = mechanism["attribution"]
    if present("mechanism", bool(attribution) and bool(mechanism["origin"]), "no origin or neuron attribution"):
        first, origin = attribution[0], mechanism["origin"][0]
        neuron, weight = first["neurons"][0], first["super_weight"]
        need(neuron["neuron"] == plant.neuron, f"mechanism: top neuron {neuron['neuron']}, planted {plant.neuron}")
        need((weight["matrix"], weight["row"], weight["col"], weight["value"]) == (matrix, plant.dim, plant.neuron, plant.write),
             f"mechanism: super weight {weight['matrix']}[{weight['row']}, {weight['col']}] = {weight['value']}, planted "
             f"{matrix}[{plant.dim}, {plant.neuron}] = {plant.write}")
        rows.append(("mechanism", True, f"written by block {origin['layer']}'s {origin['writer'].upper()}; top neuron "
                                       f"{neuron['neuron']} (planted {plant.neuron}); super weight {weight['matrix']}"
                                       f"[{weight['row']}, {weight['col']}] = {weight['value']:+g} (planted "
                                       f"[{plant.dim}, {plant.neuron}] = {plant.write:+g}), rank {weight['rank']} of "
                                       f"{weight['entries']:,}"))

    trigger = report["trigger"]
    if present("trigger", bool(trigger) and bool(trigger[0]["neurons"]), "not measured (see the report's warnings)"):
        first = trigger[0]
        neuron = first["neurons"][0]
        source = max(neuron["splits"][0]["sources"], key=lambda s: abs(s["difference"]))
        carriers = first["carriers"] or {}
        need(neuron["neuron"] == plant.neuron and source["source"] == "token embedding" and carriers.get("verdict") == "token",
             f"trigger: neuron {neuron['neuron']} fed by {source['source']}, carriers {carriers.get('verdict')}; planted "
             f"neuron {plant.neuron} fed by the token embedding, carried by the token")
        removed = sum(p["still_massive"] is False for p in first["patching"])
        rows.append(("trigger", True, f"neuron {neuron['neuron']}'s {neuron['splits'][0]['site']} fed by the {source['source']} "
                                     f"({source['here']:+.1f} of {neuron['splits'][0]['value']:+.1f}); carried by the "
                                     f"{carriers.get('verdict')}; {removed} of {len(first['patching'])} patches remove it"))

    verification = causal["verification"]
    if present("verification", verification is not None, "missing"):
        confirms = [row["name"] for row in verification["interventions"] if row["confirms"]]
        weight = next((row for row in verification["interventions"] if row["target"] == f"weight {matrix}[{plant.dim}, {plant.neuron}]"),
                      None)
        need(weight is not None and weight["confirms"] is True,
             f"verification: zeroing {matrix}[{plant.dim}, {plant.neuron}] does not confirm it")
        rows.append(("verification", True, f"{len(confirms)} of {len(verification['interventions'])} interventions confirm "
                                          f"({'; '.join(confirms)}); baseline perplexity "
                                          f"{verification['baseline_perplexity']:.2f} on {verification['eval_tokens']} tokens"))

    attention = causal["attention"]
    if present("attention sinks", attention is not None, "missing"):
        rows.append(("attention sinks", True, f"{attention['summary']}; {len(attention['interventions'])} interventions read"))

    steps = causal["super_weights"]
    if present("super weights zeroed", bool(steps), "missing"):
        first = steps[0]["weight"]
        need((first["matrix"], first["row"], first["col"]) == (matrix, plant.dim, plant.neuron),
             f"super weights: step 1 zeroes {first['matrix']}[{first['row']}, {first['col']}], planted "
             f"{matrix}[{plant.dim}, {plant.neuron}]")
        last = steps[-1]
        rows.append(("super weights zeroed", True, f"{len(steps)} step(s), step 1 {first['matrix']}[{first['row']}, "
                                                  f"{first['col']}]; after step {last['step']} "
                                                  f"{'still' if last['still_massive'] else 'no longer'} massive, perplexity "
                                                  f"x{last['perplexity_ratio']:.3f}"))

    quantization = deploy["quantization"]
    if present("quantization", quantization is not None and bool(quantization["rows"]), "missing"):
        quant_rows = quantization["rows"]
        same = verification is not None and abs(quantization["baseline_perplexity"] / verification["baseline_perplexity"] - 1) < 1e-5
        need(same, "quantization: its baseline perplexity is not verification's (the same model, text and windows)")
        kept = sorted(quant_rows, key=lambda row: row["kept_birth"])
        ratios = [row["perplexity_ratio"] for row in quant_rows]
        rows.append(("quantization", True, f"{len(quant_rows)} rows ({quantization['grid']} grid); baseline perplexity "
                                          f"{quantization['baseline_perplexity']:.2f} (verification's: "
                                          f"{'the same' if same else 'another'}); perplexity x{min(ratios):.3f} to "
                                          f"x{max(ratios):.3f}; the massive value kept from {kept[0]['kept_birth']:.3f} "
                                          f"({kept[0]['method']} {kept[0]['setting']}, {kept[0]['variant']}) to "
                                          f"{kept[-1]['kept_birth']:.3f}"))

    precision = deploy["precision"]
    if present("precision headroom", precision is not None, "missing"):
        rows.append(("precision headroom", True, precision["summary"]))

    valley = report["valley"]
    if present("compression valley", valley is not None and valley["valley"] is not None, "missing"):
        rows.append(("compression valley", True, f"lowest entropy at block {valley['valley']} (the birth block: "
                                                f"{valley['birth']}); without the massive tokens at block "
                                                f"{valley['valley_without']}"))

    qk = report["qk"]
    disruption = qk["disruption"] if qk is not None else None
    if present("Q/K", disruption is not None, "no disruption test"):
        heads = sum(bool(dims) for block in qk["blocks"] if block["keys"] is not None and block["layer"] == plant.key_layer
                    for dims in block["keys"]["dims"])
        need(disruption["blocks"] == [plant.key_layer] and heads > 0,
             f"Q/K: disruption test at blocks {disruption['blocks']}, keys planted in block {plant.key_layer}")
        base, massive, control = (disruption[key]["perplexity"] for key in ("base", "massive", "control"))
        rows.append(("Q/K", True, f"massive keys in {heads} head(s) of block {plant.key_layer} (planted); disruption test: "
                                 f"{disruption['zeroed']} dims zeroed in blocks {disruption['blocks']}, perplexity "
                                 f"{base:.2f} -> {massive:.2f} (control {control:.2f})"))
    return rows, failed


def reads(report: dict) -> str | None:
    """The report's line saying how many times the streamed scan read the checkpoint (None: it has none, as an
    in-memory scan's report)."""
    return next((line for line in report["warnings"] if READS.match(line)), None)


def table(built: dict, plant: Plant, limit: int, scan: dict, floor: dict, line: str, rows: list, command: list[str]) -> str:
    """The Markdown table of the run (with the machine, the model and the command above it); ``line``: the report's
    reads."""
    shape, size, big = built["shapes"], built["bytes"], scan["largest"]
    times, passes = READS.match(line).groups()
    number, unit = re.match(r"([0-9.]+) ([kMGT]?B):", passes).groups()
    read = float(number) * 1000 ** "BkMGT".index(unit[0])  # as massact.numbers.size writes it, to 3 or 4 digits
    blocks = shape["block_bytes"] * shape["num_hidden_layers"]
    once = size - blocks
    lines = [
        f"machine: {machine()}; load average {scan['load'][0]:.1f} before the scan, {scan['load'][1]:.1f} after (other "
        f"processes on the same cores)",
        f"model: Llama, random weights, float32, {shape['num_hidden_layers']} blocks of {in_bytes(shape['block_bytes'])} (d_model "
        f"{shape['hidden_size']}, d_mlp {shape['intermediate_size']}), {in_bytes(size)} in {built['shards']} safetensors shards; "
        f"planted: {plant.words()}",
        "command: " + " ".join(command),
        "",
        "| what | figure |",
        "|---|---|",
        f"| weights / memory limit | {in_bytes(size)} / {in_bytes(limit)} ({size / limit:.1f}x the limit) |",
        f"| peak resident memory of the scan (ru_maxrss) | **{in_bytes(scan['peak'])}** ({in_bytes(scan['peak'] - floor['peak'])} above "
        f"the {in_bytes(floor['peak'])} a process takes to import what the scan imports; VmHWM read while it ran: "
        f"{in_bytes(scan['polled_peak'])}) |",
        f"| the largest resident memory sampled (every 0.2 s) | {in_bytes(big['VmRSS'])} at {big['seconds']:.0f} s: "
        f"{in_bytes(big['RssAnon'])} anonymous, {in_bytes(big['RssFile'])} mapped files' pages (the libraries' and the "
        f"checkpoint's, which the kernel can drop) |",
        f"| times the checkpoint was read (the report's warning) | **{times}** ({passes}) |",
        f"| reads of each block, from the bytes in that line | {(read - once) / blocks:.2f}: ({in_bytes(read)} - the "
        f"{in_bytes(once)} of embeddings, final norm and head, read once) / the blocks' {in_bytes(blocks)} |",
        f"| wall clock / CPU time | **{scan['seconds']:.0f} s** / {scan['cpu_seconds']:.0f} s |",
        "",
        "| section | present | headline |",
        "|---|---|---|",
        *(f"| {name} | {'yes' if present else '**no**'} | {headline} |" for name, present, headline in rows),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    log = lambda message: print(message, file=sys.stderr, flush=True)
    root = args.dir.resolve()
    limit = parse_size(args.memory)
    built = build_child(root, args.size, args.memory, log)
    if built["bytes"] <= limit:
        sys.exit(f"the weights ({in_bytes(built['bytes'])}) fit the limit ({in_bytes(limit)}): nothing would stream")
    out = (args.out or root / "report").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # a report left from an earlier run is not this run's
    command = [sys.executable, "-m", "massact", "scan", str(root), "--memory", args.memory, "--verify", "--quant",
               "--eval-file", str(short_eval(out, args.eval_chars)), "--format", "json", "--out", str(out)]
    floor = run([sys.executable, "-c", IMPORTS], out / "imports", log)
    evict(root)  # the first read of every block from the disk, as under the limit
    scan = run(command, out / "scan", log)
    if scan["rc"] != 0:
        sys.exit(f"the scan failed (exit {scan['rc']}):\n{scan['stderr'][-3000:]}")
    report = json.loads((out / "report.json").read_text())
    line = reads(report)
    if line is None:
        sys.exit("the report has no line of the checkpoint's reads: the scan did not stream")
    plant = Plant()
    rows, failed = sections(report, plant)
    text = table(built, plant, limit, scan, floor, line, rows, ["python", "-m", "massact", *command[3:]])
    print(text)
    figures = {"table": text, "built": built, "limit": limit, "scan": {k: v for k, v in scan.items() if k not in ("stdout", "stderr")},
               "imports": {k: v for k, v in floor.items() if k not in ("stdout", "stderr")}, "reads": line,
               "failed": failed}
    (root / "bench_stream_report.json").write_text(json.dumps(figures, indent=2))
    if failed:
        sys.exit("the report is not the planted truth:\n" + "\n".join(failed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the checkpoint is built and kept")
    parser.add_argument("--size", default="600MB", help="the blocks' weights (default 600MB)")
    parser.add_argument("--memory", default="150MB", help="the limit, as massact scan --memory takes it (default 150MB)")
    parser.add_argument("--eval-chars", type=int, default=1500,
                        help="characters of the shipped evaluation text the verification and sweep score (default 1500)")
    parser.add_argument("--out", type=Path, help="the scan's report folder (default DIR/report)")
    parser.add_argument("--quick", action="store_true", help="checks the script: 75MB under 25MB (sets --size and --memory)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.memory = "75MB", "25MB"
    for value in (args.size, args.memory):
        try:
            parse_size(value)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    if args.one == "build":
        print(json.dumps(build(args.dir.resolve(), parse_size(args.size), parse_size(args.memory),
                               lambda message: print(message, file=sys.stderr, flush=True), plant=Plant())))
    else:
        main(args)
