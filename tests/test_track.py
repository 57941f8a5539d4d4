"""massact track: checkpoints aligned into a timeline, the Trainer layout, resuming, the diff, bad SPECs, and the
training monitor against an offline scan of the checkpoint saved at the same step."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import massact
from conftest import plant_mlp, tiny_config, tiny_model, weights_hash
from massact.cli import main
from massact.errors import UsageError
from massact.report.schema import load_track
from massact.texts import DEFAULT_TEXTS
from massact.track import run as track_run
from massact.track.monitor import MassactCallback, Monitor, read_records
from massact.track.specs import _revision_step as revision_step
from massact.track.specs import expand
from test_visual import assert_policy

NEURON, DIM = 7, 20
SERIES = ((100, 2), (200, 2), (300, 1))  # (step, block the planted neuron writes from): the birth moves at step 300


def save_checkpoint(path, tokenizer, layer: int, trainer_step: int | None = None):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, layer, NEURON, DIM)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if trainer_step is not None:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": trainer_step}))
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory, tokenizer):
    """A Trainer output directory whose planted writer moves from block 2 to block 1 at step 300."""
    root = tmp_path_factory.mktemp("trainer-run")
    for step, layer in SERIES:
        save_checkpoint(root / f"checkpoint-{step}", tokenizer, layer)
    return root


@pytest.fixture(scope="module")
def tracked(series, tmp_path_factory):
    out = tmp_path_factory.mktemp("track") / "out"
    assert main(["track", str(series), "--out", str(out), "--quiet"]) == 0
    return out


def test_planted_birth_block_moves(tracked):
    data = json.loads((tracked / "track.json").read_text(encoding="utf-8"))
    assert (data["format"], data["version"]) == ("massact-track", 1)
    # The schema reads it back as the Track it was written from.
    assert [c.step for c in load_track(tracked / "track.json").checkpoints] == [c["step"] for c in data["checkpoints"]]
    assert [c["step"] for c in data["checkpoints"]] == [100, 200, 300]
    assert [[d["dim"] for d in c["dims"]] for c in data["checkpoints"]] == [[DIM]] * 3
    assert [c["dims"][0]["born_at"] for c in data["checkpoints"]] == [layer for _, layer in SERIES]
    weights = [c["dims"][0]["super_weight"] for c in data["checkpoints"]]
    assert [(w["matrix"], w["row"], w["col"], w["value"], w["rank"]) for w in weights] == \
        [(f"model.layers.{layer}.mlp.down_proj.weight", DIM, NEURON, 100.0, 1) for _, layer in SERIES]
    assert data["dims"] == [{"dim": DIM, "emerged_at": 100, "values": data["dims"][0]["values"], "born_at": [2, 2, 1]}]
    assert data["events"][0].startswith(f"dim {DIM} becomes massive at step 100")
    assert f"dim {DIM}: its birth moves from block 2 to block 1 at step 300" in data["events"]
    for name in ("track.txt", "track.html", "track_values.png", "track_birth.png", "track_ratio.png", "track_super_weight.png"):
        assert (tracked / name).is_file(), name
    assert not (tracked / "track_sink.png").exists()  # no --verify: the sink is not measured, so not drawn
    page = (tracked / "track.html").read_text(encoding="utf-8")
    assert_policy(page)  # the report page's policy: no request, only its own scripts
    assert page.count('src="data:image/png;base64,') == len(list(tracked.glob("track_*.png"))) == 5
    assert "its birth moves from block 2 to block 1 at step 300" in page
    # Each checkpoint's full report, in its own folder, is the report massact scan writes.
    report = json.loads((tracked / "step-00000300" / "report.json").read_text(encoding="utf-8"))
    assert report["findings"]["dims"][0]["born_at"] == 1 and report["model"]["source"].endswith("checkpoint-300")


def test_two_processes_share_the_checkpoints_and_give_the_track_of_one(series, tracked, tmp_path):
    """Under torchrun each process scans every other checkpoint (each scanned once, by one of them); the first waits
    for the others' reports, then aligns them: the same track as one process."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "massact"]
    out = tmp_path / "two"
    result = subprocess.run([*launch, "track", str(series), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr
    for index, (step, _) in enumerate(SERIES):
        assert said.count(f"checkpoint {index + 1}/3 (step {step}): scanning") == 1, said
    one, two = (json.loads((folder / "track.json").read_text(encoding="utf-8")) for folder in (tracked, out))
    assert two == one
    for step, _ in SERIES:
        reports = (json.loads((folder / f"step-{step:08d}" / "report.json").read_text(encoding="utf-8")) for folder in (tracked, out))
        assert next(reports)["findings"]["layers"] == next(reports)["findings"]["layers"]


def test_rerun_after_an_interrupt_redoes_only_the_unfinished(series, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    scanned = []
    real = track_run._scan_one

    def interrupted(checkpoint, *args):
        if len(scanned) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third checkpoint
        scanned.append(checkpoint.step)
        return real(checkpoint, *args)

    monkeypatch.setattr(track_run, "_scan_one", interrupted)
    assert main(["track", str(series), "--out", str(out), "--quiet", "--format", "json"]) == 130
    assert scanned == [100, 200] and not (out / "step-00000300").exists()
    before = {step: (out / f"step-{step:08d}" / "report.json").stat().st_mtime_ns for step in scanned}
    scanned.clear()
    assert main(["track", str(series), "--out", str(out), "--format", "json"]) == 0
    assert scanned == [300]
    assert {step: (out / f"step-{step:08d}" / "report.json").stat().st_mtime_ns for step in before} == before
    assert "checkpoint 1/3 (step 100): already done" in capsys.readouterr().err
    # Done with other texts: refused rather than mixed into one timeline.
    assert main(["track", str(series), "--out", str(out), "--text", "Another text.", "--format", "json"]) == 2
    assert "holds a report made with other texts or settings" in capsys.readouterr().err


def test_a_diff_of_a_model_with_itself_reports_no_change(series, tmp_path, capsys):
    one = str(series / "checkpoint-100")
    assert main(["track", one, one, "--out", str(tmp_path / "out"), "--format", "json,txt"]) == 0
    diff = json.loads((tmp_path / "out" / "track.json").read_text(encoding="utf-8"))["diff"]
    assert diff["unchanged"] and diff["persist"] == [DIM] and diff["appear"] == diff["vanish"] == []
    assert [(w["matrix"], w["before"], w["after"], w["change"], w["matrix_mean_change"]) for w in diff["weights"]] == \
        [("model.layers.2.mlp.down_proj.weight", 100.0, 100.0, 0.0, 0.0)]
    assert "No change" in capsys.readouterr().out


def test_a_diff_measures_the_change_at_the_super_weight(series, tmp_path, tokenizer):
    """Two checkpoints whose planted super weight differs by 50: the change there, against the matrix's mean."""
    after = save_checkpoint(tmp_path / "tuned", tokenizer, 2)
    model = massact.load(str(after), device="cpu", log=lambda m: None).model
    weight = model.get_parameter("model.layers.2.mlp.down_proj.weight")
    with torch.no_grad():
        weight[DIM, NEURON] = 150.0
    model.save_pretrained(after)
    assert main(["track", str(series / "checkpoint-100"), str(after), "--out", str(tmp_path / "out"), "--format", "json", "--quiet"]) == 0
    change = json.loads((tmp_path / "out" / "track.json").read_text(encoding="utf-8"))["diff"]["weights"][0]
    entries = weight.numel()
    assert (change["before"], change["after"], change["change"]) == (100.0, 150.0, 50.0)
    assert change["matrix_mean_change"] == pytest.approx(50.0 / entries) and change["relative"] == pytest.approx(entries)


def test_trainer_layout_with_and_without_trainer_state(tmp_path, tokenizer):
    root = tmp_path / "run"
    for name, state in (("checkpoint-20", None), ("checkpoint-3", None), ("checkpoint-100", 7)):
        folder = root / name
        folder.mkdir(parents=True)
        tiny_config("llama", len(tokenizer)).save_pretrained(folder)
        if state is not None:  # trainer_state.json wins over the name
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": state}))
    (root / "runs").mkdir()  # a TensorBoard folder beside the checkpoints is not one
    assert [(c.step, c.spec.rsplit("/", 1)[1]) for c in expand([str(root)])] == \
        [(3, "checkpoint-3"), (7, "checkpoint-100"), (20, "checkpoint-20")]
    # Pythia's and OLMo's checkpoint branches name their step.
    assert [revision_step(r) for r in ("step3000", "stage1-step5000-tokens21B", "main")] == [3000, 5000, None]


@pytest.mark.parametrize("case", ["missing revision", "empty revision", "other architecture", "empty directory", "no config",
                                  "missing path"])
def test_bad_specs_are_one_line_and_exit_2(case, series, tmp_path, tokenizer, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "missing revision":
        specs, expected = ["HuggingFaceTB/SmolLM2-135M@step999"], "at revision 'step999' is not a local path"
    elif case == "empty revision":
        specs, expected = ["HuggingFaceTB/SmolLM2-135M@"], "ID@REVISION, with both parts"
    elif case == "other architecture":
        mixed = tmp_path / "mixed"
        shutil.copytree(series / "checkpoint-100", mixed / "checkpoint-100")
        other = tiny_model("gpt2", len(tokenizer))
        other.save_pretrained(mixed / "checkpoint-200")
        tokenizer.save_pretrained(mixed / "checkpoint-200")
        specs, expected = [str(mixed)], "is another architecture (gpt2, d_model 64, 4 blocks) than"
    elif case == "empty directory":
        (tmp_path / "empty").mkdir()
        specs, expected = [str(tmp_path / "empty")], "neither a model directory (no config.json) nor a directory of checkpoint-<step>/"
    elif case == "missing path":
        specs, expected = [str(series), str(tmp_path / "nowhere")], "nowhere: no such file or directory"
    else:
        (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
        specs, expected = [str(tmp_path / "run")], "a checkpoint folder without config.json"
    capsys.readouterr()  # what saving the models printed
    assert main(["track", *specs, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("massact: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """Four real Trainer steps of a planted tiny Llama, the monitor every 2 steps, a checkpoint every 2 steps."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("trained")
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, 2, NEURON, DIM)
    model.train()
    data = [{"input_ids": tokenizer(text).input_ids} for text in DEFAULT_TEXTS * 4]
    args = TrainingArguments(output_dir=str(root / "run"), max_steps=4, save_steps=2, logging_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_only_model=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    callback = MassactCallback.attach(trainer, every=2, path=root / "monitor.jsonl")
    trainer.train()
    return root, trainer, callback


def test_callback_logs_what_an_offline_scan_of_the_saved_checkpoint_finds(trained):
    root, trainer, callback = trained
    logged = [entry for entry in trainer.state.log_history if "massact/block_02/top1" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    # The trainer's own log of the same steps (the loss) is still there.
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3, 4]
    records = read_records(root / "monitor.jsonl")
    assert [r["step"] for r in records] == [2, 4] and records == callback.records
    for record, entry in zip(records, logged):
        lm = massact.load(str(root / "run" / f"checkpoint-{record['step']}"), device="cpu", log=lambda m: None)
        report = massact.scan(lm, list(DEFAULT_TEXTS))
        massive = [sum(m.layer == layer.layer for m in report.findings.massive) for layer in report.findings.layers]
        for block, layer, count in zip(record["blocks"], report.findings.layers, massive):
            assert block["median"] == pytest.approx(layer.median, rel=1e-4)
            assert block["top1"] == pytest.approx(abs(layer.top[0].value), rel=1e-4)
            assert (block["top_dim"], block["massive"]) == (layer.top[0].dim, count)
            assert entry[f"massact/block_{block['layer']:02d}/ratio"] == block["ratio"]
    assert records[0]["blocks"][2]["massive"] >= 1 and records[0]["blocks"][2]["top_dim"] == DIM


def test_monitor_leaves_weights_and_training_mode_as_they_were(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.train()
    before = weights_hash(model)
    record = Monitor(tokenizer, every=5).step(model, 10)
    assert record["step"] == 10 and len(record["blocks"]) == model.config.num_hidden_layers
    assert model.training and weights_hash(model) == before
    assert Monitor(tokenizer, every=5).step(model, 11) is None


def test_track_draws_the_monitor_timeline(trained, tmp_path):
    root, _, _ = trained
    assert main(["track", str(root / "monitor.jsonl"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    data = json.loads((tmp_path / "out" / "track.json").read_text(encoding="utf-8"))
    assert [c["step"] for c in data["checkpoints"]] == [2, 4]
    assert data["dims"][0]["dim"] == DIM and data["dims"][0]["emerged_at"] == 2
    assert (tmp_path / "out" / "track_ratio.png").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "blocks": [{"layer": 0}]}\n{"step": 2}\n')
    assert main(["track", str(bad), "--out", str(tmp_path / "out2")]) == 2


def test_monitor_lines_are_read_through_the_schema(tmp_path):
    """A monitor line is checked against the dataclasses the monitor writes: a bad field is named, with its line."""
    from dataclasses import asdict

    from massact.analysis.track.results import MonitorBlock, MonitorRecord
    from massact.settings import Criterion

    block = MonitorBlock(layer=0, top1=5.0, median=0.1, ratio=50.0, massive=0, top_dim=7)
    good = asdict(MonitorRecord(step=3, texts=2, blocks=[block], criterion=Criterion()))
    path = tmp_path / "monitor.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert read_records(path) == [good]
    bad = {**good, "blocks": [{**good["blocks"][0], "top1": "x"}]}
    for record, message in ((dict(good, step=-1), "field step must be an integer >= 0"),
                            (bad, "field blocks[0].top1 must be a number or null")):
        path.write_text(json.dumps(record) + "\n" + json.dumps(good) + "\n")
        with pytest.raises(UsageError, match=f"monitor.jsonl:1: {re.escape(message)}"):
            read_records(path)
