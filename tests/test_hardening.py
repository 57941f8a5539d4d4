"""Bad input and faults: each ends in one line on stderr and exit code 2, and a resumed scan is the scan it resumes."""

import errno
import json
import os
import pickle
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import massact
from massact.analysis.detect.scan import _load_state
from massact.capture.stats import LogHistogram, TopK
from massact.errors import UsageError
from massact.models.loading import load
from massact.report import atomic
from massact.report.schema import read_report
from massact.texts import MAX_TEXT_CHARS, Corpus

from conftest import run_massact, save_planted

LAYER, NEURON, DIM = 1, 37, 20
TINY = ["--no-verify", "--format", "json", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_planted(tmp_path_factory.mktemp("hardening") / "llama", "llama", tokenizer, LAYER, NEURON, DIM)


@pytest.fixture(scope="module")
def same_word_corpus(tmp_path_factory):
    """600 lines that all begin with the same word: far more than 512 entries of each block's top-k tie."""
    path = tmp_path_factory.mktemp("corpus") / "same.txt"
    tails = ["is warm.", "met on Tuesday.", "opens at nine.", "shows where you are.", "fell on the garden today."]
    path.write_text("\n".join(f"Summer {tails[i % 5]} {i % 7}" for i in range(600)) + "\n", encoding="utf-8")
    return path


def one_line_error(result, *fragments: str) -> str:
    """The run failed with exit code 2 and one line on stderr holding every fragment; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("massact: error:") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def small_corpus(same_word_corpus):
    path = same_word_corpus.with_name("small.txt")
    path.write_text("\n".join(same_word_corpus.read_text(encoding="utf-8").splitlines()[:40]), encoding="utf-8")
    return path


def interrupt(model: Path, corpus: Path, out: Path, after: int, batch_size: int = 4) -> int:
    """Scan ``corpus`` as the CLI would (same model spec, default settings, a checkpoint every batch) and stop it
    after ``after`` windows, like a kill: OUT/scan-state.pt is left. Returns how many windows the state covers."""

    def progress(stage, total):
        seen = [0]

        def step():
            seen[0] += 1
            if seen[0] == after:
                raise Stop

        return step

    lm = load(str(model), device="cpu", log=lambda message: None)
    with pytest.raises(Stop):
        massact.scan(lm, Corpus(file=str(corpus)), batch_size=batch_size, checkpoint=out / "scan-state.pt",
                     checkpoint_every=1, progress=progress)
    return torch.load(out / "scan-state.pt", weights_only=True)["done"]


# 1 and 2. Resuming


def test_a_resumed_scan_equals_the_uninterrupted_one_byte_for_byte(model_dir, same_word_corpus, tmp_path):
    common = [model_dir, "--file", same_word_corpus, *TINY, "--batch-size", "16"]
    clean = run_massact("scan", *common, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "resumed"
    assert interrupt(model_dir, same_word_corpus, out, after=321, batch_size=16) == 320  # the last whole batch before the stop
    resumed = run_massact("scan", *common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    first, second = ((d / "report.json").read_bytes() for d in (tmp_path / "clean", out))
    assert first == second  # no field is excluded: the report holds no time or run id
    data = json.loads(first)
    assert data["corpus"]["texts"] == 600 and len(data["massive"]) >= 512
    # Ties were broken by the smaller (text, position, dim): the first block with massive entries keeps the
    # first-token entries of the first texts.
    born = [m for m in data["massive"] if m["layer"] == LAYER]
    assert len(born) == 512 and sorted(m["text"] for m in born) == list(range(512))


def test_the_top_k_keeps_the_same_entries_whatever_the_order_of_updates():
    torch.manual_seed(0)
    values = torch.randint(-3, 4, (2000,)).float()  # 7 distinct values: hundreds of ties in |a|
    labels = torch.stack([torch.arange(2000) // 100, torch.arange(2000) % 100 // 10, torch.arange(2000) % 10], dim=1)
    kept = []
    for order, size in ((torch.arange(2000), 2000), (torch.randperm(2000), 7), (torch.randperm(2000), 333)):
        top = TopK(50)
        for part in order.split(size):
            top.update(values[part], labels[part])
        kept.append(top.items())
    assert kept[0] == kept[1] == kept[2]
    # |a| = 3 first, then by (text, position, dim): the first 50 of the 3s and -3s in label order.
    expected = [[t, p, d] for t, p, d in labels.tolist() if abs(values[t * 100 + p * 10 + d]) == 3][:50]
    assert [labels for _, labels in kept[0]] == expected


@pytest.mark.parametrize("change", ["another model", "dtype", "min-ratio", "batch size"])
def test_resume_refuses_the_state_of_another_model_or_settings(change, model_dir, small_corpus, tmp_path, tokenizer):
    model, out = shutil.copytree(model_dir, tmp_path / "model"), tmp_path / "out"
    interrupt(model, small_corpus, out, after=9)
    options = ["--batch-size", "4"]
    if change == "another model":  # the same path, class, shapes and tokenizer: only the weights differ (another neuron)
        other = save_planted(tmp_path / "other", "llama", tokenizer, LAYER, NEURON + 1, DIM)
        shutil.copy(other / "model.safetensors", model / "model.safetensors")
    options += {"dtype": ["--dtype", "bfloat16"], "min-ratio": ["--min-ratio", "500"], "batch size": ["--batch-size", "2"]}.get(change, [])
    result = run_massact("scan", model, "--file", small_corpus, *TINY, *options, "--out", out, "--resume")
    one_line_error(result, "is the state of another scan")
    if change == "dtype":  # while the same scan resumes
        assert run_massact("scan", model, "--file", small_corpus, *TINY, "--batch-size", "4", "--out", out, "--resume").returncode == 0


# 3. A damaged or foreign scan state


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path(__file__).parent / 'pwned'}",))


def _states(tmp_path: Path) -> dict[str, Path]:
    good = {"done": 4, "fingerprint": "f", "identity": "", "counts": [torch.zeros(8192, dtype=torch.float64)] * 2,
            "tops": [None, None]}
    cases = {
        "random bytes": os.urandom(4096),
        "empty": b"",
        "raw pickle": pickle.dumps(Evil()),
    }
    paths = {}
    for name, content in cases.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    objects = {
        "malicious pickle": Evil(),
        "a list": [1, 2, 3],
        "no done": {k: v for k, v in good.items() if k != "done"},
        "string done": dict(good, done="4"),
        "wrong bins": dict(good, counts=[torch.zeros(10, dtype=torch.float64)] * 2),
        "wrong blocks": dict(good, counts=[torch.zeros(8192, dtype=torch.float64)] * 3, tops=[None] * 3),
        "wrong labels": dict(good, tops=[(torch.ones(3), torch.zeros(3, 2, dtype=torch.long)), None]),
        "too many entries": dict(good, tops=[(torch.ones(600), torch.zeros(600, 3, dtype=torch.long)), None]),
    }
    for name, value in objects.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(value, paths[name])
    return paths


def test_a_damaged_or_foreign_scan_state_is_one_line(tmp_path):
    for name, path in _states(tmp_path).items():
        histograms, tops = [LogHistogram() for _ in range(2)], [TopK(512) for _ in range(2)]
        with pytest.raises(UsageError) as caught:
            _load_state(path, histograms, tops, identity="")
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"cannot read the scan state {path}"), (name, message)
        assert "weights_only" not in message and "unsafe" not in message.lower(), (name, message)
    assert "empty" in _message(tmp_path / "empty.pt") and "no 'done'" in _message(tmp_path / "no done.pt")
    assert "8192" in _message(tmp_path / "wrong bins.pt")
    assert not (Path(__file__).parent / "pwned").exists()  # the pickle's code never ran


def _message(path: Path) -> str:
    with pytest.raises(UsageError) as caught:
        _load_state(path, [LogHistogram() for _ in range(2)], [TopK(512) for _ in range(2)], identity="")
    return str(caught.value)


def test_a_malicious_scan_state_from_the_cli(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan-state.pt").write_bytes(pickle.dumps(Evil()))  # a plain pickle: torch.load also warns about it
    result = run_massact("scan", model_dir, "--text", "Summer is warm.", *TINY, "--out", out, "--resume")
    line = one_line_error(result, "cannot read the scan state", "not a scan state written by massact")
    assert "weights_only" not in line and not (Path(__file__).parent / "pwned").exists()


def test_a_full_disk_while_saving_the_scan_state_leaves_no_partial(tmp_path, monkeypatch):
    from massact.analysis.detect import scan

    def full(state, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UsageError, match="cannot write the scan state .* No space left on device"):
        scan._save_state(tmp_path / "scan-state.pt", 1, "f", [LogHistogram()], [TopK(4)])
    assert list(tmp_path.iterdir()) == []


# 4. Where the report cannot be written


@pytest.mark.parametrize("where", ["under a file", "a file", "under /proc"])
def test_an_unwritable_out_fails_before_the_model_loads(where, tmp_path):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    out = {"under a file": tmp_path / "file" / "report", "a file": tmp_path / "file", "under /proc": Path("/proc/massact-test/r")}[where]
    # The model does not exist: the error about --out must come first, before anything is loaded.
    result = run_massact("scan", tmp_path / "no-such-model", "--text", "Summer is warm.", "--out", out)
    one_line_error(result, "cannot write the report to")
    result = run_massact("compare", tmp_path / "no-report", "--out", out)
    one_line_error(result, "cannot write the report to")


def test_a_read_only_out(model_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    one_line_error(run_massact("scan", model_dir, "--text", "Summer is warm.", "--out", locked / "r"), "Permission denied")


@pytest.mark.parametrize("layout", ["swapped", "in place"])
def test_a_full_disk_leaves_no_partial_file(layout, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old", encoding="utf-8")
    if layout == "in place":
        (out / "sub").mkdir()  # a subdirectory: the set is written file by file
    real = Path.write_bytes

    def full(path, data):
        real(path, data[:10])  # part of it reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UsageError, match="No space left on device"):
        atomic.write_set(out, {"report.json": "new", "layout.png": b"\x89PNG" * 100})
    assert (out / "report.json").read_text(encoding="utf-8") == "old"
    left = sorted(p.name for p in out.iterdir()) + sorted(p.name for p in tmp_path.iterdir())
    assert left == (["report.json", "sub"] if layout == "in place" else ["report.json"]) + ["out"], left


# 5. Damaged weights and devices


def _damage(model_dir: Path, target: Path, how: str) -> Path:
    shutil.copytree(model_dir, target)
    weights = target / "model.safetensors"
    if how in ("wrong shape", "missing tensor"):
        tensors = load_file(weights)
        key = f"model.layers.{LAYER}.mlp.down_proj.weight"
        if how == "wrong shape":
            tensors[key] = torch.zeros(3, 3)
        else:
            del tensors[key]
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "garbage":
        weights.write_bytes(os.urandom(2048))
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


@pytest.mark.parametrize("how,message", [("wrong shape", "has shape [3, 3] in the weights, the config needs [64, 256]"),
                                         ("missing tensor", "missing from the weights, first model.layers.1.mlp.down_proj.weight"),
                                         ("garbage", "cannot load"), ("truncated", "cannot load")])
def test_damaged_safetensors_are_one_line(how, message, model_dir, tmp_path):
    damaged = _damage(model_dir, tmp_path / "damaged", how)
    one_line_error(run_massact("scan", damaged, "--text", "Summer is warm.", *TINY, "--out", tmp_path / "r"), message)


def test_an_unknown_device_is_one_line(model_dir, tmp_path):
    one_line_error(run_massact("scan", model_dir, "--device", "foo", "--out", tmp_path / "r"), "device 'foo' is not one of")


# 6. Thresholds


@pytest.mark.parametrize("option,value", [("--min-ratio", "-5"), ("--min-abs", "0"), ("--min-abs", "nan")])
def test_thresholds_must_be_positive(option, value, model_dir, tmp_path):
    one_line_error(run_massact("scan", model_dir, option, value, "--out", tmp_path / "r"), f"{option} must be a positive number")


# 7. Hand-edited reports


@pytest.fixture(scope="module")
def saved(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "report"
    result = run_massact("scan", model_dir, "--text", "Summer is warm.", *TINY, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def _edited(saved: Path, target: Path, edit) -> Path:
    data = json.loads((saved / "report.json").read_text(encoding="utf-8"))
    edit(data)
    target.mkdir()
    (target / "report.json").write_text(json.dumps(data), encoding="utf-8")
    return target


def test_a_saved_report_passes_the_check(saved):
    report = read_report(json.loads((saved / "report.json").read_text(encoding="utf-8")))
    assert report.massive[0].dim == DIM and report.dims[0].born_at == LAYER


def test_verify_and_compare_name_the_bad_field(saved, tmp_path):
    text_threshold = _edited(saved, tmp_path / "a", lambda d: d["criterion"].update(min_abs="100"))
    one_line_error(run_massact("verify", text_threshold), "field criterion.min_abs must be a positive number")
    negative = _edited(saved, tmp_path / "b", lambda d: d["corpus"]["spec"].update(max_texts=-3))
    one_line_error(run_massact("verify", negative), "field corpus.spec.max_texts must be an integer >= 1 or null")
    no_origin = _edited(saved, tmp_path / "c", lambda d: d.pop("origin"))
    one_line_error(run_massact("compare", saved, no_origin, "--out", tmp_path / "cmp"), "no field origin")
    assert not (tmp_path / "cmp").exists()
    bad_top = _edited(saved, tmp_path / "d", lambda d: d["layers"][2]["top"][0].update(value="big"))
    one_line_error(run_massact("compare", bad_top, "--out", tmp_path / "cmp"), "field layers[2].top[0].value must be a number")


# 8. A huge line


def test_a_50_mb_line_is_refused_with_bounded_memory(model_dir, tmp_path):
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:
        for _ in range(50):
            handle.write(b"winter " * ((1 << 20) // 7 + 1))  # 50 MB, no newline
    tracemalloc.start()
    with pytest.raises(UsageError, match=f"line 1 of {huge} is longer than {MAX_TEXT_CHARS:,} characters"):
        Corpus(file=str(huge)).check()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * MAX_TEXT_CHARS, peak  # what one bounded read holds, not the 50 MB line
    one_line_error(run_massact("scan", model_dir, "--file", huge, "--out", tmp_path / "r"), "line 1 of", "split it")
    # Lines of a paragraph are bounded together.
    paragraph = tmp_path / "paragraph.txt"
    paragraph.write_text("Intro.\n\n" + ("word " * 100_000 + "\n") * 3 + "\nEnd.\n", encoding="utf-8")
    with pytest.raises(UsageError, match="a paragraph of"):
        list(Corpus(file=str(paragraph)))
    with pytest.raises(UsageError, match="text 2 is longer than"):
        list(Corpus(("Short.", "x" * (MAX_TEXT_CHARS + 1))))


# 9. Smaller ones


def test_a_one_token_eval_text_is_refused_before_the_scan(tmp_path):
    from tokenizers import processors

    from conftest import make_tokenizer

    no_bos = make_tokenizer()  # like SmolLM2's, it adds no BOS: "a" is one token
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    model_dir = save_planted(tmp_path / "model", "llama", no_bos, LAYER, NEURON, DIM)
    stages = []
    lm = load(str(model_dir), device="cpu", log=lambda message: None)
    with pytest.raises(UsageError, match="fewer than 2 tokens"):
        massact.scan(lm, ["Summer is warm."], verify=True, eval_text="a", progress=lambda stage, total: stages.append(stage))
    assert stages == []  # no forward pass was started
    one_token = tmp_path / "one.txt"
    one_token.write_text("a\n", encoding="utf-8")
    one_line_error(run_massact("scan", model_dir, "--text", "Summer is warm.", "--verify", "--eval-file", one_token,
                               "--quiet", "--out", tmp_path / "r"), "fewer than 2 tokens")


def test_a_directory_as_file_says_so(model_dir, tmp_path):
    one_line_error(run_massact("scan", model_dir, "--file", tmp_path, "--out", tmp_path / "r"), "is a directory, not a file of texts")


def test_the_gguf_bar_follows_the_progress_bar_switch(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    from massact.models.loading import gguf_bar_follows_switch

    hf_logging.disable_progress_bar()
    try:
        with gguf_bar_follows_switch():
            list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert capfd.readouterr().err == ""
    finally:
        hf_logging.enable_progress_bar()
    with gguf_bar_follows_switch():
        list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting" in capfd.readouterr().err  # the switch on: the bar is drawn


def test_the_set_is_replaced_whole_and_the_users_files_stay(tmp_path):
    out = tmp_path / "out"
    atomic.write_set(out, {"report.json": "1", "report.txt": "1", "report.html": "1", "layer_profile.png": b"1"})
    (out / "notes.md").write_text("mine", encoding="utf-8")
    inode = (out / "notes.md").stat().st_ino
    atomic.write_set(out, {"report.json": "2"})  # e.g. --format json: the old txt, html and figure were run 1's
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "report.json"]
    assert (out / "report.json").read_text(encoding="utf-8") == "2" and (out / "notes.md").stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden staging directory left


def test_an_interrupted_write_leaves_the_previous_set_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    atomic.write_set(out, {"report.json": "1", "report.txt": "1"})
    real, calls = atomic._write, []

    def interrupted(path, content):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C between the first and the second file
        real(path, content)

    monkeypatch.setattr(atomic, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_set(out, {"report.json": "2", "report.txt": "2"})
    assert {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()} == {"report.json": "1", "report.txt": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A SIGKILL leaves its staging directory: the next write removes it once its process is gone.
    stale = tmp_path / ".out.massact-999999999"
    stale.mkdir()
    (stale / "report.json").write_text("half", encoding="utf-8")
    monkeypatch.setattr(atomic, "_write", real)
    atomic.write_set(out, {"report.json": "3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
