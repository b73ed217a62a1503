"""report.html: built from a real (tiny) run, checked as HTML, and opened in Debian's
headless Chromium — every section present, every image decoded, no console error.

Set ``LGVQ_REPORT_UNDER_TEST=runs/cvq_lg/report.html`` to check another report (e.g. the
quick start's) in the browser, and ``LGVQ_REPORT_SCREENSHOT=docs/img/report.png`` to keep
the browser's screenshot of it (how docs/img/report.png is made).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import browser_check
import pytest
import torch
from PIL import Image

from lgvq_plugins.config import bundled_gin_dir
from lgvq_plugins.evaluation import report as R
from lgvq_plugins.run import main as run_main

TINY = str(bundled_gin_dir() / "tiny.gin")
SECTION_IDS = [sid for sid, _ in R.RUN_SECTIONS]
needs_chromium = pytest.mark.skipif(browser_check.chromium() is None,
                                    reason="Debian's chromium is not installed (apt-get install -y chromium; "
                                           ".ci/run installs it as root)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A guided tiny run (2 steps) that wrote its report at the end."""
    import gin

    root = tmp_path_factory.mktemp("runs")
    gin.clear_config()
    run_main(["--gin", TINY, "--root", str(root), "--gin_bindings", "MAX_STEPS = 2"])
    gin.clear_config()
    return root / "tiny"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tags: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_run_report_is_self_contained_with_every_section(tiny_run):
    page = _parse(tiny_run / "report.html")
    assert page.sections == SECTION_IDS
    assert "script" not in page.tags and "link" not in page.tags  # nothing to fetch, nothing to run
    assert not [u for u in page.links if re.match(r"(https?:)?//", u)]
    # reconstructions + usage + loss curves + one heatmap per caption (3)
    assert len(page.images) == 6
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.width > 50 and im.height > 50
    text = (tiny_run / "report.html").read_text(encoding="utf-8")
    assert 'class="missing"' not in text  # every section drew its figure
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert f"{metrics['val_psnr']:.4g}" in text and "split=val; batches=2" in text  # number + protocol


@needs_chromium
def test_report_in_headless_chromium(request, tmp_path):
    under_test = os.environ.get("LGVQ_REPORT_UNDER_TEST")  # no tiny run needed for another report
    target = Path(under_test) if under_test else request.getfixturevalue("tiny_run") / "report.html"
    seen, console = browser_check.inspect(target, tmp_path)
    ids = [s["id"] for s in seen["sections"]]
    # the fixed sections, then one per downstream task that ran (none in the tiny run)
    assert ids[: len(SECTION_IDS)] == SECTION_IDS and all(i.startswith("task-") for i in ids[len(SECTION_IDS):])
    assert all(s["heading"] for s in seen["sections"])
    assert not [s for s in seen["sections"] if s["missing"]], "a section could not draw its content"
    assert len(seen["images"]) >= 6
    for img in seen["images"]:
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img["alt"]
        assert img["inline"], img["alt"]
    assert seen["errors"] == [] and console == []
    shot = browser_check.screenshot(target, tmp_path / "report.png", tmp_path)
    with Image.open(shot) as im:
        assert im.size == (1100, 3000)
        import numpy as np

        assert len(np.unique(np.asarray(im.convert("L").resize((64, 160))))) > 20  # not a blank page
    keep = os.environ.get("LGVQ_REPORT_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)


@needs_chromium
def test_the_browser_probe_sees_broken_images_and_errors(tmp_path):
    """The checks above would catch a broken page: a missing image, a script error, a
    console.error call."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head></head><body><section id="a"><h2>A</h2>'
                   '<img alt="gone" src="gone.png"></section><script>console.error("boom"); null.x;</script>'
                   "</body></html>")
    seen, console = browser_check.inspect(bad, tmp_path / "probe")
    assert seen["images"][0]["naturalWidth"] == 0
    assert any("boom" in e for e in seen["errors"]) and any("null" in e for e in seen["errors"])
    assert any("Uncaught TypeError" in line for line in console)


def _metrics(name: str, guided: bool, psnr: float, backbone: str = "vqgan") -> dict:
    return {"name": name, "backbone": backbone, "dataset": "shapes", "guidance": guided, "val_psnr": psnr,
            "val_protocol": {"split": "val", "batches": 2},
            "tasks": {"reconstruction": {"metrics": {"psnr": psnr + 1, "lpips": None, "fid": 3.0},
                                         "protocol": {"split": "test", "images": 64,
                                                      "fid": {"extractor": "shapes_probe"}},
                                         "unavailable": {"lpips": "no LPIPS weights"}}}}


def test_metrics_table_protocols_unavailable_and_twin():
    html = R.metrics_table(_metrics("cvq_lg", True, 20.0), _metrics("cvq", False, 21.5), twin_label="twin: cvq")
    rows = {r["key"]: r for r in R.metric_rows(_metrics("cvq_lg", True, 20.0))}
    assert rows["reconstruction/psnr"]["value"] == 21.0
    assert rows["reconstruction/psnr"]["protocol"] == "split=test; images=64"  # short beside the number
    assert rows["reconstruction/fid"]["protocol"] == "split=test; images=64; fid.extractor=shapes_probe"
    assert "<b>reconstruction</b>: split=test; images=64; fid.extractor=shapes_probe" in html  # in full once
    assert rows["reconstruction/lpips"]["value"] is None and rows["reconstruction/lpips"]["note"] == "no LPIPS weights"
    assert rows["val_psnr"]["protocol"] == "split=val; batches=2"
    assert "twin: cvq" in html and ">22.5<" in html and ">21<" in html  # twin's number beside ours
    assert "—" in html and "no LPIPS weights" in html  # unavailable is shown as such, never 0


def test_find_twin_prefers_the_name_match(tmp_path):
    def make(name, guided, backbone="vqgan"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(_metrics(name, guided, 1.0, backbone)))
        return tmp_path / name

    run = make("cvq_lg", True)
    assert R.find_twin(run) is None
    make("other_unguided", False)
    make("cvq_other_backbone", False, backbone="vqvae")
    assert R.find_twin(run) == tmp_path / "other_unguided"
    make("cvq", False)
    assert R.find_twin(run) == tmp_path / "cvq"
    assert R.find_twin(tmp_path / "cvq") == run


def test_word_code_similarity_is_the_cosine_of_word_and_code(tiny_run):
    from lgvq_plugins.pretrained import from_pretrained

    model = from_pretrained(tiny_run / "pretrained")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    captions = ["a red circle", "two blue squares left of a cross"]
    (words0, sim0), (words1, sim1) = R.word_code_similarity(model, x, captions)
    assert words0 == ["a", "red", "circle"] and len(words1) == 7
    h, w = model.grid
    assert sim0.shape == (3, h, w) and sim1.shape == (7, h, w)
    # by hand: the word "red" (token 2, after [CLS]) against the code at row 1, column 2
    with torch.no_grad():
        q = model.tokenizer.encode(x)
        v = model.code_text.proj_out(model.code_text.hidden(q.z_q))[0, 1 + 1 * w + 2]
        t = model.text_encoder.encode_captions(captions).token_feats[0, 2]
    expected = torch.nn.functional.cosine_similarity(t, v, dim=0)
    assert sim0[1, 1, 2].item() == pytest.approx(expected.item(), abs=1e-5)


def test_usage_counts_cover_every_code_position(tiny_run):
    import lgvq_plugins
    from lgvq_plugins.pretrained import from_pretrained

    model = from_pretrained(tiny_run / "pretrained")
    data = lgvq_plugins.create_dataset("shapes", split="test", size=32, num_samples=10)
    counts = R.usage_counts(model, data, batch_size=4)
    h, w = model.grid
    assert len(counts) == model.tokenizer.quantizer.num_codes and sum(counts) == 10 * h * w
    x = torch.stack([data[i]["image"] for i in range(10)])
    with torch.no_grad():
        direct = torch.bincount(model.tokenizer.encode(x).indices.flatten(), minlength=len(counts))
    assert counts == direct.tolist()


def test_a_figure_that_fails_is_noted_in_the_page(tiny_run, tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("decoder exploded")

    import lgvq_plugins

    data = lgvq_plugins.create_dataset("shapes", split="test", size=32, num_samples=4)
    with pytest.warns(RuntimeWarning, match="could not be drawn"):
        out = R.write_run_report(tiny_run, model=Broken(), data=data, out=tmp_path / "r.html", twin=False)
    text = out.read_text()
    assert "could not be drawn: RuntimeError: decoder exploded" in text
    assert _parse(out).sections == SECTION_IDS  # the rest of the report is still there
