"""Figures, the HTML page (also in a real headless browser), --format, and massact compare."""

import base64
import hashlib
import html
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

import massact
from conftest import plant_attention, plant_mlp, run_massact, save_planted, tiny_model
from massact.numbers import short
from massact.report.html import to_html
from massact.report.plots import FIGURES, PIXELS, figures
from massact.report.sections import SECTIONS

LAYER, NEURON, DIM = 1, 37, 20
TEXTS = ["The library opens at nine in the morning.", "Summer is warm. Winter is cold."]
PARTS = ["Summary", "Token view", "Interactive figures", *(s.heading for s in SECTIONS), "Conclusion", "Figures", "Settings"]
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
    assert sorted(pngs) == sorted(set(FIGURES) - {"super_experts.png"})  # a dense model has no experts (test_experts.py)
    for data in pngs.values():
        image = assert_png(data).convert("L")
        assert max(image.tobytes()) - min(image.tobytes()) > 100  # something is drawn, not a blank canvas
    assert verified.mechanism.birth_state.layer == LAYER and DIM in verified.mechanism.birth_state.dims
    assert len(verified.mechanism.birth_state.magnitude) == len(verified.findings.tokens[verified.mechanism.birth_state.text])


def test_figures_without_an_mlp_writer_leave_out_the_mlp_figures(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    plant_attention(model, tokenizer.bos_token_id, LAYER, 2, DIM)
    pngs = figures(massact.scan(model, TEXTS, tokenizer=tokenizer))
    # no neuron writes: no trigger figure
    assert set(pngs) == {"layer_profile.png", "massive_heatmap.png", "lifeline.png", "valley.png"}


def test_html_has_every_section_and_its_images(verified):
    pngs = figures(verified)
    page = to_html(verified, pngs)
    for part in PARTS:
        assert f"<h2>{html.escape(part)}</h2>" in page, part
        assert page.count(f">{html.escape(part)}</a></li>") == 1, part  # and once in the table of contents
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(pngs.values())
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert verified.conclusion[0].split(";")[0] in html.unescape(page)


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def _dom(page_path, tmp_path) -> str:
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page_path.as_uri()],
                          capture_output=True, text=True, timeout=120).stdout


def _attribute(dom: str, name: str) -> str:
    body = re.search(r"<body[^>]*>", dom).group(0)
    return html.unescape(re.search(fr'{name}="([^"]*)"', body).group(1))


def _render(page_path, tmp_path):
    flags = [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = _dom(page_path, tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([BROWSER, *flags, f"--screenshot={shot}", "--window-size=1280,2000", page_path.as_uri()],
                   capture_output=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    assert _attribute(dom, "data-requests") == "0" and _attribute(dom, "data-refused") == "0"  # nothing asked of the network
    return total, loaded, Image.open(shot).convert("L")


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (make test installs it when run as root)")
def test_report_renders_in_a_headless_browser(verified, tmp_path):
    from massact.report.files import write_report

    write_report(verified, tmp_path / "report", {"html"})
    total, loaded, shot = _render(tmp_path / "report" / "report.html", tmp_path)
    drawn = len(FIGURES) - 1  # every figure but the experts' (a dense model)
    assert total == drawn and loaded == total
    pixels = shot.tobytes()
    assert len(set(pixels)) > 50 and sum(p < 200 for p in pixels) > 0.01 * len(pixels)  # text and figures, not blank

    broken = tmp_path / "broken.html"
    broken.write_text((tmp_path / "report" / "report.html").read_text().replace("base64,iVBOR", "base64,XXXX", 1))
    total, loaded, _ = _render(broken, tmp_path)
    assert (total, loaded) == (drawn, drawn - 1)  # the check does see a broken image


# Played in the page once it has loaded: hover the first token, then move the block slider to block 0.
_INTERACT = """<script>
window.addEventListener("load", function () {
  var colours = function () {
    return Array.prototype.map.call(document.querySelectorAll("#tv-texts .tok"), function (s) { return s.style.background; }).join("|");
  };
  var token = document.querySelector("#tv-texts .tok");
  token.dispatchEvent(new MouseEvent("mouseover", { bubbles: true, clientX: 20, clientY: 20 }));
  var tip = document.getElementById("tv-tip"), before = colours(), slider = document.getElementById("tv-block");
  document.body.setAttribute("data-test-block", slider.value);
  slider.value = 0;
  slider.dispatchEvent(new Event("input", { bubbles: true }));
  document.body.setAttribute("data-test-tip", tip.hidden ? "" : tip.textContent);
  document.body.setAttribute("data-test-changed", String(before !== colours()));
});
</script></body>"""


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _allowed(page: str, ending: str) -> str:
    """The page with its "</body>" replaced by ``ending`` (a <script> element, then "</body>"), that script's hash
    added to the policy: how the test plays an interaction in the page."""
    script = re.search(r"<script>(.*)</script>", ending, re.S).group(1)
    return page.replace("script-src ", f"script-src {_digest(script)} ", 1).replace("</body>", ending)


def assert_policy(page: str) -> None:
    """The page forbids every request and runs only its own inline scripts and styles, each allowed by its hash."""
    csp = html.unescape(re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1))
    rules = dict(rule.strip().split(" ", 1) for rule in csp.split(";"))
    assert rules["default-src"] == "'none'" and rules["img-src"] == "data:" and "unsafe" not in csp
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)  # the JSON data block is not run: it needs no hash
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert scripts and styles
    assert rules["script-src"].split() == [_digest(s) for s in scripts] and rules["style-src"].split() == [_digest(s) for s in styles]


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (make test installs it when run as root)")
def test_token_view_hover_and_block_slider_in_a_headless_browser(verified, tmp_path):
    page = to_html(verified, {})
    assert_policy(page)
    played = tmp_path / "played.html"
    played.write_text(_allowed(page, _INTERACT), encoding="utf-8")
    dom = _dom(played, tmp_path)
    values = verified.mechanism.token_values
    assert values.dims[0] == DIM and _attribute(dom, "data-test-block") == str(LAYER)  # opens at the birth block
    first = values.values[0][0][LAYER][0]  # the first token of the first text, at the birth block
    assert abs(first) > 1000  # the planted value
    tip = _attribute(dom, "data-test-tip")
    assert "position 0" in tip and f"dim {DIM} at block {LAYER}: {short(first)} " in tip
    assert _attribute(dom, "data-test-changed") == "true"  # block 0 has no massive value: the colours change
    assert _attribute(dom, "data-requests") == "0" and _attribute(dom, "data-refused") == "0"

    leaky = tmp_path / "leaky.html"  # the check does see a request the policy refuses
    leaky.write_text(page.replace("</main>", '<img src="http://127.0.0.1:9/x.png"></main>'), encoding="utf-8")
    assert _attribute(_dom(leaky, tmp_path), "data-refused") == "1"

    injected = tmp_path / "injected.html"  # a script that got into the page without the policy's hash does not run
    injected.write_text(page.replace("</main>", '<script>document.body.setAttribute("data-injected", "ran")</script></main>'),
                        encoding="utf-8")
    dom = _dom(injected, tmp_path)
    assert _attribute(dom, "data-refused") == "1" and "data-injected" not in re.search(r"<body[^>]*>", dom).group(0)
    assert _attribute(dom, "data-ready") == "1"  # the page's own script still ran


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
    for name in set(FIGURES) - {"quantization.png", "super_experts.png"}:  # scanned without --quant, no experts
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
        born = data["findings"]["dims"][0]["born_at"]
        assert f"{DIM} (block {born}, MLP)" in page
        assert directory.name in page
    assert "removes it" in page  # the verified GPT-2 column carries its ablation result
    assert_policy(page)  # the same policy as the report's page
    assert_policy((saved_reports[0] / "report.html").read_text(encoding="utf-8"))
    assert_png((tmp_path / "cmp" / "compare_profiles.png").read_bytes())
    assert run("compare", tmp_path / "nowhere").returncode == 2
