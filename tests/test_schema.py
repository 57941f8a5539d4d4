"""The one schema of the files massact reads back: report.json and protect.json round-trip, and every hand-edited
field is one line naming it."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest

from conftest import N_LAYERS, PLANTED, TINY, one_line_error, run_massact
from massact.analysis.causal.results import Causal
from massact.analysis.deploy.protect import check_model
from massact.analysis.mechanism.results import ROLES
from massact.analysis.results import build_protect
from massact.errors import UsageError
from massact.models.loading import load
from massact.report.compare import summary
from massact.report.mechanism import carrier_words
from massact.report.schema import REPORT_VERSION, load_protect, load_report, read, read_report, write_protect, write_report
from massact.report.text import to_text

LAYER, NEURON, DIM = PLANTED


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
    assert report.findings.massive[0].dim == DIM and report.findings.dims[0].born_at == LAYER


def test_verify_and_compare_name_the_bad_field(saved, tmp_path):
    text_threshold = _edited(saved, tmp_path / "a", lambda d: d["findings"]["criterion"].update(min_abs="100"))
    one_line_error(run_massact("verify", text_threshold), "field findings.criterion.min_abs must be a positive number")
    negative = _edited(saved, tmp_path / "b", lambda d: d["corpus"]["spec"].update(max_texts=-3))
    one_line_error(run_massact("verify", negative), "field corpus.spec.max_texts must be an integer >= 1 or null")
    no_origin = _edited(saved, tmp_path / "c", lambda d: d["mechanism"].pop("origin"))
    one_line_error(run_massact("compare", saved, no_origin, "--out", tmp_path / "cmp"), "no field mechanism.origin")
    assert not (tmp_path / "cmp").exists()
    bad_top = _edited(saved, tmp_path / "d", lambda d: d["findings"]["layers"][2]["top"][0].update(value="big"))
    one_line_error(run_massact("compare", bad_top, "--out", tmp_path / "cmp"), "field findings.layers[2].top[0].value must be a number")




def _data(saved: Path) -> dict:
    return json.loads((saved / "report.json").read_text(encoding="utf-8"))


def test_the_report_reads_back_as_it_was_written(saved):
    data = _data(saved)
    assert (data["format"], data["version"]) == ("massact-report", REPORT_VERSION)
    assert json.loads(write_report(read_report(data))) == data
    # A flat report without the format and version fields is version 1 and is converted; a newer version is refused.
    old = {k: v for k, v in json.loads(V1.read_text(encoding="utf-8")).items() if k not in ("format", "version")}
    assert read_report(old).findings.massive == read_report(dict(old, version=1)).findings.massive
    with pytest.raises(UsageError, match="report format version 3; this massact reads versions 1 and 2"):
        read_report(dict(data, version=3))


def test_every_role_and_phase_the_writer_uses_reads_back(saved):
    """The checked loader once refused the default model's own reports (role "precursor")."""
    data = _data(saved)
    for role in ROLES:
        data["mechanism"]["origin"][0]["role"] = role
        assert read_report(data).mechanism.origin[0].role == role
    data["mechanism"]["origin"][0]["role"] = "bogus"
    with pytest.raises(UsageError, match=r"field mechanism.origin\[0\].role must be one of 'precursor', 'precursor erasure', 'birth'"):
        read_report(data)


def test_every_adapter_detects_in_a_stream_the_schema_reads():
    """The schema checks a report's detection stream against ``massact.sites.STREAMS`` (it does not import the
    adapters, which load torch): each family's stream, and any a variant of it sets, must be one of them."""
    from massact.models.adapters import ADAPTERS
    from massact.sites import STREAMS

    for adapter in ADAPTERS:
        streams = {adapter.stream} | {v.changes["stream"] for v in adapter.variants if "stream" in v.changes}
        assert streams <= set(STREAMS), (adapter.family, streams)


def _set(data, path: tuple, value):
    """A copy of ``data`` with the field at ``path`` (keys and list indices) set to ``value`` (``DELETE``: removed)."""
    edited = copy.deepcopy(data)
    *parent, last = path
    holder = edited
    for key in parent:
        holder = holder[key]
    if value is DELETE:
        del holder[last]
    else:
        holder[last] = value
    return edited


DELETE = object()


@pytest.mark.parametrize("path,value,message", [
    (("findings", "texts"), ["Summer is warm."], "field findings.texts must be an object"),
    (("findings", "massive", 0, "text"), 999, "field findings.massive[0].text must be a window listed in texts, not 999"),
    (("mechanism", "lifelines"), DELETE, "no field mechanism.lifelines"),
    (("mechanism", "lifelines"), {}, "field mechanism.lifelines must be a list, not {}"),
    (("mechanism", "lifelines", 0, "dim"), "abc", "field mechanism.lifelines[0].dim must be an integer in [0, 64), not \"abc\""),
    (("mechanism", "lifelines", 0, "steps", 0, "phase"), "hold on", "field mechanism.lifelines[0].steps[0].phase must be one of"),
    (("findings", "layers"), [], "field findings.layers must hold one entry per block (model.n_layers)"),
    (("findings", "dims", 0, "dim"), 64, "field findings.dims[0].dim must be an integer in [0, 64), not 64"),
    (("mechanism", "origin", 0, "layer"), N_LAYERS,
     f"field mechanism.origin[0].layer must be an integer in [0, {N_LAYERS}), not {N_LAYERS}"),
    (("findings", "dims", 0, "removed_at"), [0], "field findings.dims[0].removed_at[0] must be an integer in [1, 4), not 0"),
    (("findings", "massive", 0, "bonus"), 1, "field findings.massive[0].bonus is not a field of Massive"),
    (("model", "name"), None, "field model.name must be a string, not null"),
    (("model", "dtype"), "float8", "field model.dtype must be one of 'float32', 'bfloat16', 'float16'"),
    (("findings", "criterion", "min_abs"), None, "field findings.criterion.min_abs must be a positive number, not null"),
    (("corpus", "spec", "max_length"), 64, "field corpus.spec.max_length is not a field of Corpus"),
    (("corpus", "spec", "texts", 0), 7, "field corpus.spec.texts[0] must be a string, not 7"),
    (("causal", "verification"), [], "field causal.verification must be an object or null, not []"),
    (("findings", "tokens", "x"), [], "field findings.tokens.x is not an integer key"),
])
def test_an_edited_report_names_the_field(saved, path, value, message):
    with pytest.raises(UsageError) as caught:
        read_report(_set(_data(saved), path, value), "R/report.json")
    assert str(caught.value).startswith("R/report.json: not a massact report (") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def _leaves(data, path=()):
    """Every field's path, the first item of each list standing for all of them."""
    yield path
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(data, list) and data:
        yield from _leaves(data[0], path + (0,))


def test_every_field_null_wrong_type_or_out_of_range_reads_back_or_is_one_line(saved):
    """Each field of a real report set to null, to a wrong type, to -1 and to a huge number: it is refused in one line
    naming the field, or the report reads and every consumer that needs no model (the comparison, the protect list,
    the text report, the writer) works on it."""
    data = _data(saved)
    paths = [p for p in _leaves(data) if p and p[0] not in ("format", "version")]
    assert len(paths) > 250
    tried = refused = 0
    for path in paths:
        for value in (None, {"x": 1}, -1, 10**12, "text"):
            tried += 1
            try:
                report = read_report(_set(data, path, value))
            except UsageError as error:
                refused += 1
                assert "\n" not in str(error) and "field " in str(error), (path, value, error)
                continue
            summary(report)
            if report.findings.dims:
                build_protect(report)
            to_text(report)
            write_report(report)
    assert refused > 0.6 * tried, (refused, tried)  # most are refused (1163 of 1585 when written); the rest ran the consumers


def test_nulls_the_writer_writes_for_inf_and_nan_compare(saved, tmp_path):
    """Null where the format writes null for inf/nan (as a float16 overflow makes) reads back as nan."""
    data = _data(saved)
    for path in [("mechanism", "attribution", 0, "output"), ("mechanism", "attribution", 0, "neurons", 0, "share"),
                 ("mechanism", "attribution", 0, "super_weight", "value"), ("findings", "massive", 0, "value"),
                 ("findings", "layers", 0, "top", 0, "value"), ("findings", "layers", 0, "median")]:
        data = _set(data, path, None)
    edited = tmp_path / "nulls"
    edited.mkdir()
    (edited / "report.json").write_text(json.dumps(data), encoding="utf-8")
    report = read_report(data)
    assert math.isnan(report.findings.massive[0].value) and math.isnan(report.mechanism.attribution[0].super_weight.value)
    result = run_massact("compare", saved, edited, "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")
    assert "nan" in page and "Traceback" not in result.stderr


# protect.json


@pytest.fixture(scope="module")
def protect_data(saved):
    return json.loads((saved / "protect.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def planted_lm(model_dir):
    return load(str(model_dir), device="cpu", log=lambda message: None)


@pytest.mark.parametrize("path,value,message", [
    (("massive_dims", 0, "extra"), 1, "field massive_dims[0].extra is not a field of ProtectedDim"),
    (("massive_dims", 0, "carriers", 0, "extra"), 1, "field massive_dims[0].carriers[0].extra is not a field of Carrier"),
    (("sink_positions", 0, "extra"), 1, "field sink_positions[0].extra is not a field of SinkPosition"),
    (("super_weights", 0, "extra"), 1, "field super_weights[0].extra is not a field of ProtectedWeight"),
    (("super_weights", 0, "index"), [1e30, 1], "field super_weights[0].index[0] must be an integer >= 0, not 1e+30"),
    (("massive_dims", 0, "dim"), -1, "field massive_dims[0].dim must be an integer >= 0, not -1"),
    (("massive_dims", 0, "peak_block"), -5, "field massive_dims[0].peak_block must be an integer >= 0, not -5"),
    (("super_weights", 0, "index"), [-1, -1], "field super_weights[0].index[0] must be an integer >= 0, not -1"),
    (("version",), True, "field version must be one of 1, not true"),
])
def test_an_edited_protect_list_names_the_field(protect_data, tmp_path, path, value, message):
    target = tmp_path / "protect.json"
    target.write_text(json.dumps(_set(protect_data, path, value)), encoding="utf-8")
    with pytest.raises(UsageError) as caught:
        load_protect(target)
    assert str(caught.value) == f"{target}: not a protect list ({message})" or message in str(caught.value), str(caught.value)


@pytest.mark.parametrize("path,value,message", [
    (("massive_dims", 0, "dim"), 99999, "massive_dims[0].dim is 99999; the model has 64 dims"),
    (("massive_dims", 0, "born_at"), 99, "massive_dims[0].born_at names block 99; the model has 4 blocks"),
    (("massive_dims", 0, "blocks"), [1, 99], "massive_dims[0].blocks names block 99"),
    (("massive_dims", 0, "probe_position"), 999, "massive_dims[0].probe_position is 999; the probe text has"),
    (("massive_dims", 0, "probe_text"), "word " * 200, "massive_dims[0].probe_text is 602 tokens; the model's context is 64"),
    (("super_weights", 0, "index"), [], "super_weights[0].index [] (row 20, col 37) is not an entry of"),
    (("super_weights", 0, "index"), [9], "super_weights[0].index [9]"),
    (("super_weights", 0, "index"), [20, 37, 0], "super_weights[0].index [20, 37, 0]"),
    (("super_weights", 0, "index"), [20, 9999], "is not an entry of model.layers.1.mlp.down_proj.weight, shape [64, 256]"),
    (("super_weights", 0, "value"), 5.0, "is +100 in the model, the list says +5; is this the model the list was made for?"),
    (("super_weights", 0, "parameter"), "model.nothing", "super_weights[0].parameter 'model.nothing' is not a parameter"),
])
def test_a_protect_list_that_does_not_fit_the_model_is_one_line(protect_data, planted_lm, tmp_path, path, value, message):
    target = tmp_path / "protect.json"
    target.write_text(json.dumps(_set(protect_data, path, value)), encoding="utf-8")
    protect = load_protect(target)
    with pytest.raises(UsageError, match=None) as caught:
        check_model(protect, planted_lm, str(target))
    assert message in str(caught.value) and str(caught.value).startswith(f"{target}: "), str(caught.value)


def test_the_protect_list_reads_back_and_fits_its_model(protect_data, planted_lm, tmp_path):
    target = tmp_path / "protect.json"
    target.write_text(json.dumps(protect_data), encoding="utf-8")
    protect = load_protect(target)
    check_model(protect, planted_lm, str(target))
    assert json.loads(write_protect(protect)) == protect_data
    assert [(w.parameter, w.index, w.value) for w in protect.super_weights] == [
        (f"model.layers.{LAYER}.mlp.down_proj.weight", [DIM, NEURON], 100.0)]


def test_read_takes_any_result_dataclass_for_other_files():
    """``read`` is what a new file (track.json) calls: its own dataclass, the same rules."""
    from massact.analysis.detect.results import DimSummary

    assert read(DimSummary, {"dim": 3, "born_at": 1, "persists": [1, 2], "removed_at": [3], "max_value": 150.0, "tokens": ["<s>"]},
                "track.json").persists == [1, 2]
    with pytest.raises(UsageError,
                       match=r"^track.json: field persists\[1\] must be an integer >= 0|^track.json: field persists\[1\] must be"):
        read(DimSummary, {"dim": 3, "born_at": 1, "persists": [1, "2"], "removed_at": [], "max_value": 1.0, "tokens": []}, "track.json")


def test_a_track_dim_emerges_at_a_step_or_a_label_and_nothing_else():
    """track.json's ``emerged_at`` is a step (int), a checkpoint's label (str) or null: each reads back as itself, and
    anything else is one line naming the field and the three kinds."""
    from massact.analysis.track.results import DimTrack

    base = {"dim": 507, "values": [0.0, 24000.5], "born_at": [None, 11]}
    assert [read(DimTrack, {**base, "emerged_at": at}, "track.json").emerged_at for at in (300, "base", None)] == [300, "base", None]
    for wrong in ([300], 3.5, True):
        with pytest.raises(UsageError, match=r"^track.json: field emerged_at must be an integer or a string or null"):
            read(DimTrack, {**base, "emerged_at": wrong}, "track.json")


V1 = Path(__file__).parent / "data" / "report_v1.json"  # the planted Llama, built-in sentences, --no-verify, format version 1


def _v1_dir(model_dir: Path, target: Path) -> Path:
    """tests/data/report_v1.json in a report folder of its own, pointing at the test run's planted model (the same
    weights, saved at another path)."""
    data = json.loads(V1.read_text(encoding="utf-8"))
    data["model"].update(name=str(model_dir), source=str(model_dir))
    target.mkdir()
    (target / "report.json").write_text(json.dumps(data), encoding="utf-8")
    return target


def _same(old, new, where: str = "report") -> None:
    """Field by field, floats within 1e-5 relative (nan equal to nan)."""
    if dataclasses.is_dataclass(old):
        assert type(old) is type(new), where
        for spec in dataclasses.fields(old):
            _same(getattr(old, spec.name), getattr(new, spec.name), f"{where}.{spec.name}")
    elif isinstance(old, dict):
        assert old.keys() == new.keys(), where
        for key in old:
            _same(old[key], new[key], f"{where}[{key!r}]")
    elif isinstance(old, (list, tuple)):
        assert len(old) == len(new), where
        for i, (a, b) in enumerate(zip(old, new)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(old, float):
        assert (math.isnan(old) and math.isnan(new)) or old == pytest.approx(new, rel=1e-5, abs=1e-9), where
    else:
        assert old == new, where


def test_a_version_1_report_reads_back_as_the_same_scan_made_now(model_dir, tmp_path):
    old = load_report(_v1_dir(model_dir, tmp_path / "v1"))
    result = run_massact("scan", model_dir, "--no-verify", "--format", "json", "--quiet", "--out", tmp_path / "v2")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "v2" / "report.json").read_text(encoding="utf-8"))
    assert (written["format"], written["version"]) == ("massact-report", REPORT_VERSION) == ("massact-report", 2)
    new = load_report(tmp_path / "v2")
    old.versions, new.versions = {}, {}  # the libraries that made each, not what they found
    # Version 1 came before the compression valley: its report has neither the section nor its conclusion line.
    assert old.valley is None and new.valley is not None and new.conclusion[-1].startswith("Compression valley: ")
    new.valley, new.conclusion = None, new.conclusion[:-1]
    assert old.qk is None and new.qk is not None  # version 1 had no Q/K section: it reads as not measured
    new.qk = None
    _same(old, new)
    assert old.findings.dims[0].dim == DIM and old.mechanism.lifelines and old.causal == Causal()
    # Version 1 stored the token-or-position words; the report words them now from the verdict and the probes.
    stored = json.loads(V1.read_text(encoding="utf-8"))["trigger"][0]["carriers"]["summary"]
    assert carrier_words(old.trigger[0]) == carrier_words(new.trigger[0]) == stored


def test_verify_quant_and_compare_take_a_version_1_report(model_dir, tmp_path):
    v1 = _v1_dir(model_dir, tmp_path / "v1")
    result = run_massact("compare", v1, v1, "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    result = run_massact("quant", v1, "--quant-grid", "none", "--engine", "quanto", "--quiet", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads((v1 / "report.json").read_text(encoding="utf-8"))
    assert data["version"] == REPORT_VERSION and data["deploy"]["quantization"]["engines"]
    result = run_massact("verify", v1, "--quiet", "--format", "json")
    assert result.returncode == 0, result.stderr
    verified = load_report(v1)
    assert verified.causal.verification is not None and verified.findings.dims[0].dim == DIM
