"""Figures, the HTML page (also in a real headless browser), --format, and massact compare."""

import base64
import html
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

import massact
from massact.report.html import to_html
from massact.report.plots import FIGURES, PIXELS, figures

from conftest import plant_attention, plant_mlp, run_massact, save_planted, tiny_model

LAYER, NEURON, DIM = 1, 37, 20
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]
SECTIONS = ["1. Layer scan", "2. Massive activations", "3. Lifeline", "4. Origin", "5. MLP anatomy", "6. Neuron attribution",
            "7. Trigger", "8. Super weights", "9. Verification by intervention", "10. Attention sinks", "11. Quantization",
            "12. Precision headroom", "Conclusion", "Figures", "Settings"]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def assert_png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == PIXELS
    return image


@pytest.fixture(scope="module")
def verified(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plant_mlp(model, tokenizer.bos_token_id, LAYER, NEURON, DIM)
    return massact.scan(model, TEXTS, tokenizer=tokenizer, verify=True, eval_text=" ".join(TEXTS * 4), quant=True)


def test_every_figure_is_drawn_for_a_verified_planted_model(verified):
    pngs = figures(verified)
    assert sorted(pngs) == sorted(FIGURES)
    for data in pngs.values():
        image = assert_png(data).convert("L")
        assert max(image.tobytes()) - min(image.tobytes()) > 100  # something is drawn, not a blank canvas
    assert verified.birth_state.layer == LAYER and DIM in verified.birth_state.dims
    assert len(verified.birth_state.magnitude) == len(verified.tokens[verified.birth_state.text])


def test_figures_without_an_mlp_writer_leave_out_the_mlp_figures(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    plant_attention(model, tokenizer.bos_token_id, LAYER, 2, DIM)
    pngs = figures(massact.scan(model, TEXTS, tokenizer=tokenizer))
    assert set(pngs) == {"layer_profile.png", "massive_heatmap.png", "lifeline.png"}  # no neuron writes: no trigger figure


def test_html_has_every_section_and_its_images(verified):
    pngs = figures(verified)
    page = to_html(verified, pngs)
    for section in SECTIONS:
        assert f"<h2>{section}" in page, section
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(pngs.values())
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert verified.conclusion[0].split(";")[0] in html.unescape(page)


def _render(page_path, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([BROWSER, *flags, "--dump-dom", page_path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    shot = tmp_path / "shot.png"
    subprocess.run([BROWSER, *flags, f"--screenshot={shot}", "--window-size=1280,2000", page_path.as_uri()],
                   capture_output=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    return total, loaded, Image.open(shot).convert("L")


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (make test installs it when run as root)")
def test_report_renders_in_a_headless_browser(verified, tmp_path):
    from massact.report.files import write_report

    write_report(verified, tmp_path / "report", {"html"})
    total, loaded, shot = _render(tmp_path / "report" / "report.html", tmp_path)
    assert total == len(FIGURES) and loaded == total
    pixels = shot.tobytes()
    assert len(set(pixels)) > 50 and sum(p < 200 for p in pixels) > 0.01 * len(pixels)  # text and figures, not blank

    broken = tmp_path / "broken.html"
    broken.write_text((tmp_path / "report" / "report.html").read_text().replace("base64,iVBOR", "base64,XXXX", 1))
    total, loaded, _ = _render(broken, tmp_path)
    assert (total, loaded) == (len(FIGURES), len(FIGURES) - 1)  # the check does see a broken image


run = run_massact


@pytest.fixture(scope="module")
def saved_reports(tmp_path_factory, tokenizer):
    """Two saved reports from the CLI: a planted GPT-2 (verified) and a planted Llama (not verified)."""
    root = tmp_path_factory.mktemp("saved")
    outs = []
    for family, layer, verify in (("gpt2", 2, "--verify"), ("llama", 1, "--no-verify")):
        save_planted(root / family, family, tokenizer, layer, NEURON, DIM)
        out = root / f"report-{family}"
        result = run("scan", root / family, "--text", TEXTS[0], "--text", TEXTS[1], verify, "--quiet", "--out", out)
        assert result.returncode == 0, result.stderr
        outs.append(out)
    return outs


def test_cli_writes_png_and_html_and_format_chooses(saved_reports, tmp_path):
    gpt2 = saved_reports[0]
    for name in set(FIGURES) - {"quantization.png"}:  # scanned without --quant
        assert_png((gpt2 / name).read_bytes())
    assert "9. Verification by intervention" in (gpt2 / "report.html").read_text(encoding="utf-8")
    model_dir = gpt2.parent / "gpt2"
    out = tmp_path / "only-json"
    assert run("scan", model_dir, "--text", TEXTS[0], "--no-verify", "--format", "json", "--quiet", "--out", out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["protect.json", "report.json"]


def test_compare_two_saved_reports(saved_reports, tmp_path):
    result = run("compare", *saved_reports, "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")
    for directory in saved_reports:
        data = json.loads((directory / "report.json").read_text(encoding="utf-8"))
        born = data["dims"][0]["born_at"]
        assert f"{DIM} (block {born}, MLP)" in page
        assert directory.name in page
    assert "removes it" in page  # the verified GPT-2 column carries its ablation result
    assert_png((tmp_path / "cmp" / "compare_profiles.png").read_bytes())
    assert run("compare", tmp_path / "nowhere").returncode == 2
