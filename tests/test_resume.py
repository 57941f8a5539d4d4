"""Resuming a scan: a resumed scan is the scan it resumes, and a damaged, foreign or malicious scan state is one line."""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import massact
from conftest import PLANTED, TINY, one_line_error, run_massact, save_planted
from massact.analysis.detect.scan import restore_state
from massact.capture.blocks import BlockRecorder
from massact.capture.stats import LogHistogram, TopK
from massact.errors import UsageError
from massact.models.loading import load
from massact.texts import Corpus

LAYER, NEURON, DIM = PLANTED


@pytest.fixture(scope="module")
def same_word_corpus(tmp_path_factory):
    """600 lines that all begin with the same word: far more than 512 entries of each block's top-k tie."""
    path = tmp_path_factory.mktemp("corpus") / "same.txt"
    tails = ["is warm.", "met on Tuesday.", "opens at nine.", "shows where you are.", "fell on the garden today."]
    path.write_text("\n".join(f"Summer {tails[i % 5]} {i % 7}" for i in range(600)) + "\n", encoding="utf-8")
    return path


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


# Resuming


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
    assert data["corpus"]["texts"] == 600 and len(data["findings"]["massive"]) >= 512
    # Ties were broken by the smaller (text, position, dim): the first block with massive entries keeps the
    # first-token entries of the first texts.
    born = [m for m in data["findings"]["massive"] if m["layer"] == LAYER]
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


# A damaged or foreign scan state


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path(__file__).parent / 'pwned'}",))


BINS = LogHistogram().bins


def _blocks(n: int = 2, **changes) -> dict:
    """A recorder's state of ``n`` blocks, nothing seen yet, with ``changes`` to its first block's statistics
    ("histogram" and "top": fields of their states)."""
    state = BlockRecorder(n, 512, "cpu").state_dict()
    state["histograms"][0] |= changes.get("histogram", {})
    state["tops"][0] |= changes.get("top", {})
    return state


def _states(tmp_path: Path) -> dict[str, Path]:
    good = {"done": 4, "fingerprint": "f", "identity": "", "blocks": _blocks(), "experts": None}
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
        "the old format": {k: v for k, v in good.items() if k != "blocks"} | {"counts": [torch.zeros(BINS, dtype=torch.float64)] * 2,
                                                                                   "tops": [None, None]},
        "wrong bins": dict(good, blocks=_blocks(histogram={"counts": torch.zeros(10, dtype=torch.float64)})),
        "wrong blocks": dict(good, blocks=_blocks(3)),
        "wrong labels": dict(good, blocks=_blocks(top={"values": torch.ones(3), "labels": torch.zeros(3, 2, dtype=torch.long)})),
        "too many entries": dict(good, blocks=_blocks(top={"values": torch.ones(600), "labels": torch.zeros(600, 3, dtype=torch.long)})),
        "another top-k": dict(good, blocks=_blocks(top={"k": 4})),
        "a histogram for a top-k": dict(good, blocks=_blocks(top=LogHistogram().state_dict())),
        "unordered entries": dict(good, blocks=_blocks(top={"values": torch.tensor([1.0, 2.0]),
                                                            "labels": torch.zeros(2, 3, dtype=torch.long)})),
        "experts of no mixture": dict(good, experts={"kind": "ExpertMaxima", "routed": torch.zeros(2, 4), "shared": torch.zeros(2)}),
    }
    for name, value in objects.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(value, paths[name])
    return paths


def test_a_damaged_or_foreign_scan_state_is_one_line(tmp_path):
    for name, path in _states(tmp_path).items():
        with pytest.raises(UsageError) as caught:
            restore_state(path, BlockRecorder(2, 512, "cpu"), identity="")
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"cannot read the scan state {path}"), (name, message)
        assert "weights_only" not in message and "unsafe" not in message.lower(), (name, message)
    assert "empty" in _message(tmp_path / "empty.pt") and "no 'done'" in _message(tmp_path / "no done.pt")
    assert "no 'blocks'" in _message(tmp_path / "the old format.pt")
    # The statistic's field is named, under the block that holds it.
    assert f"blocks: histograms[0]: counts: has 10 bins, not {BINS}" in _message(tmp_path / "wrong bins.pt")
    assert "blocks: histograms: 3 blocks, the model 2" in _message(tmp_path / "wrong blocks.pt")
    assert "blocks: tops[0]: labels: 2 per entry, not 3" in _message(tmp_path / "wrong labels.pt")
    assert "blocks: tops[0]: values: holds 600 entries, more than k = 512" in _message(tmp_path / "too many entries.pt")
    assert "blocks: tops[0]: k: the state keeps 4 entries" in _message(tmp_path / "another top-k.pt")
    assert "blocks: tops[0]: kind: 'LogHistogram', not 'TopK'" in _message(tmp_path / "a histogram for a top-k.pt")
    assert "blocks: tops[0]: values: not in kept order" in _message(tmp_path / "unordered entries.pt")
    assert "no mixture-of-experts block" in _message(tmp_path / "experts of no mixture.pt")
    assert not (Path(__file__).parent / "pwned").exists()  # the pickle's code never ran


def _message(path: Path) -> str:
    with pytest.raises(UsageError) as caught:
        restore_state(path, BlockRecorder(2, 512, "cpu"), identity="")
    return str(caught.value)


def test_a_saved_scan_state_loads_back_into_the_recorder_exactly(tmp_path):
    """What ``save_state`` writes, ``restore_state`` reads back: every block's counts and kept entries, and the count
    of windows and the fingerprint."""
    from massact.analysis.detect import scan

    generator = torch.Generator().manual_seed(3)
    saved = BlockRecorder(2, 6, "cpu")
    saved.start(torch.arange(3), torch.arange(15), 5)
    for layer in range(2):
        hidden = torch.randn(3, 5, 4, generator=generator).round(decimals=1)  # rounding makes ties
        hidden[1, 2, layer] = float("nan")
        saved.add(layer, hidden)
    saved.finish()
    scan.save_state(tmp_path / "scan-state.pt", 3, "f", saved)
    loaded = BlockRecorder(2, 6, "cpu")
    state = restore_state(tmp_path / "scan-state.pt", loaded, identity="")
    assert (state["done"], state["fingerprint"]) == (3, "f")
    for (h1, t1), (h2, t2) in zip(zip(*saved.sync()), zip(*loaded.sync())):
        assert torch.equal(h1.counts, h2.counts) and repr(t1.items()) == repr(t2.items()) and len(t1.items()) == 6


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
        scan.save_state(tmp_path / "scan-state.pt", 1, "f", BlockRecorder(1, 4, "cpu"))
    assert list(tmp_path.iterdir()) == []



def test_a_resumed_mixture_of_experts_scan_keeps_every_statistic_of_the_uninterrupted_one(tokenizer, tmp_path):
    """The scan state holds the experts' maxima beside the blocks' statistics: a Mixtral scan stopped after 3 of its
    5 batches and resumed has the histograms, top-k lists and experts' maxima of one that ran through."""
    from conftest import tiny_model
    from massact.analysis.detect.scan import Checkpointing, scan_layers

    lm = massact.wrap(tiny_model("mixtral", len(tokenizer), seed=3), tokenizer)
    texts = [f"Summer {word} on day {i}." for i, word in enumerate(["is warm", "met", "opens", "shows", "fell"] * 2)]
    windows = [tokenizer(text, return_tensors="pt").input_ids for text in texts]
    clean = scan_layers(lm, iter(windows), 8, batch_size=2)

    def stop_at(index: int) -> None:
        if index == 6:  # inside the fourth batch: the state holds three
            raise Stop

    state = tmp_path / "scan-state.pt"
    with pytest.raises(Stop):
        scan_layers(lm, iter(windows), 8, on_window=stop_at, batch_size=2, state=Checkpointing(path=state, every=1, identity="i"))
    assert torch.load(state, weights_only=True)["done"] == 6
    resumed = scan_layers(lm, iter(windows), 8, batch_size=2, state=Checkpointing(path=state, every=1, resume=True, identity="i"))
    assert not state.exists()
    for one, other in zip(clean.histograms, resumed.histograms):
        assert torch.equal(one.counts, other.counts)
    assert [top.items() for top in clean.tops] == [top.items() for top in resumed.tops]
    assert clean.experts[0].isfinite().any() and all(torch.equal(a, b) for a, b in zip(clean.experts, resumed.experts))
    with pytest.raises(Stop):  # a state without the experts' maxima is not this model's
        scan_layers(lm, iter(windows), 8, on_window=stop_at, batch_size=2, state=Checkpointing(path=state, every=1, identity="i"))
    torch.save(torch.load(state, weights_only=True) | {"experts": None}, state)
    with pytest.raises(UsageError, match="no experts' maxima of this model in it"):
        scan_layers(lm, iter(windows), 8, batch_size=2, state=Checkpointing(path=state, resume=True, identity="i"))
