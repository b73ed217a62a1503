"""The downstream tasks in ``lgvq compare`` and the reports: a tiny
comparison (2 variants, 1 seed, 2 training steps) runs all seven downstream tasks; its table
holds each task's numbers with their protocol, its report and each run's report show each
task's outputs (samples, captions, answers, boxes). ``Comparison.tokenizers_from`` evaluates
another comparison's tokenizers without training or writing there."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import browser_check
import numpy as np
import pytest
import torch
from PIL import Image

import gin
from lgvq_plugins.cli import main as cli_main
from lgvq_plugins.evaluation import task_views as V
from lgvq_plugins.evaluation.task_plots import split_pairs
from lgvq_plugins.training.experiment import Experiment

TASKS = ["text_to_image", "unconditional", "completion", "semantic_synthesis", "captioning", "vqa", "grounding"]
KINDS = {"text_to_image": "generation", "unconditional": "generation", "completion": "generation",
         "semantic_synthesis": "generation", "captioning": "captions", "vqa": "answers", "grounding": "boxes"}
#: one headline number per task that must reach the table
NUMBERS = {"text_to_image": "fid", "unconditional": "fid", "completion": "fid", "semantic_synthesis": "fid",
           "captioning": "bleu_4", "vqa": "accuracy", "grounding": "acc_0.5"}
VARIANTS = {"base": ["tiny.gin", "LanguageGuided.enabled = False"], "lg": ["tiny.gin"]}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_bindings(cache: Path) -> list[str]:
    """The smallest second stage: 24 training images, 6 updates, 6 evaluated images."""
    per_task = [f"lgvq.task.{t}.{k}" for t in TASKS
                for k in ("train_images = 24", f"cache_dir = '{cache}'", "batch_size = 4", "max_images = 6")]
    # an 8x8 code grid (tiny.gin has 16x16): sampling is one forward pass per code
    return ["MAX_STEPS = 2", "vqgan.ch_mult = (1, 2, 2)", "Trainer.val_every = 0", "Trainer.ckpt_every = 0", "Experiment.eval_batches = 1",
            f"lgvq.metric.shapes_probe.cache_dir = '{cache}'", "lgvq.metric.shapes_probe.num_train = 32",
            "lgvq.metric.shapes_probe.steps = 3", "second_stage_training.steps = 6",
            "second_stage_training.batch_size = 4", "CodeGPT.width = 32", "CodeGPT.depth = 1", "CodeGPT.heads = 2",
            "CodeReader.width = 32", "CodeReader.depth = 1", "CodeReader.heads = 2", "captioning.meteor = False",
            *per_task]


def _write(path: Path, name: str, variants: dict, tasks: list[str], cache: Path, extra: str = "") -> str:
    path.write_text(f"""
Comparison.name = '{name}'
Comparison.variants = {variants!r}
Comparison.seeds = [0]
Comparison.tasks = {tasks!r}
Comparison.bindings = {_tiny_bindings(cache)!r}
{extra}
""")
    return str(path)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("downstream_cmp")
    gin.clear_config()
    spec = _write(tmp / "cmp.gin", "tiny_downstream", VARIANTS, TASKS, tmp / "cache")
    assert cli_main(["compare", "--gin", spec, "--root", str(tmp / "out")]) == 0
    gin.clear_config()
    yield tmp, tmp / "out" / "tiny_downstream"
    gin.clear_config()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: dict[str, list[str]] = {}  # section id -> image srcs

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if tag == "img":
            self.images.setdefault(self.sections[-1] if self.sections else "", []).append(attrs["src"])


def _page(path: Path) -> tuple[_Page, str]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return page, text


def _decoded(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_every_downstream_task_reaches_the_table_with_its_protocol(downstream):
    _, out = downstream
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["status"] == {"base_s0": "trained", "lg_s0": "trained"}
    md = (out / "comparison.md").read_text()
    for task, metric in NUMBERS.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {task}/{metric} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and "split=val" in cells[3] and "images=6" in cells[3], row
        for variant, value in zip(VARIANTS, cells[1:3]):  # one seed: the value alone, the run's own
            run = json.loads((out / "runs" / f"{variant}_s0" / "metrics.json").read_text())
            assert float(value) == pytest.approx(run["tasks"][task]["metrics"][metric], rel=1e-3, abs=1e-4)


def test_comparison_report_shows_each_tasks_outputs_side_by_side(downstream):
    _, out = downstream
    page, text = _page(out / "report.html")
    assert page.sections == ["summary", "comparison", "figures", *[f"task-{t}" for t in TASKS], "runs"]
    for task in ("text_to_image", "unconditional", "completion", "semantic_synthesis", "grounding"):
        (src,) = page.images[f"task-{task}"]  # one figure: every variant's samples / boxes
        with _decoded(src) as im:
            assert im.width > 200 and im.height > 100
    # captions: every variant's generated captions, against the references
    for variant in VARIANTS:
        examples = json.loads((out / "runs" / f"{variant}_s0" / "eval" / "captioning" / "captions.json").read_text())
        for ex in examples:
            assert f">{ex['generated'] or '—'}<" in text or ex["generated"] == ""
        assert f"generated: {variant} (seed 0)" in text
    run = json.loads((out / "runs" / "lg_s0" / "metrics.json").read_text())
    vqa = run["tasks"]["vqa"]["tables"]["examples"]
    assert html.escape(vqa[0]["question"]) in text and "answer: base (seed 0)" in text
    assert len(page.images["task-vqa"]) == 6 and len(page.images["task-captioning"]) == 6  # a thumbnail per row
    assert 'class="missing"' not in text


def test_each_run_report_shows_its_tasks_outputs(downstream):
    _, out = downstream
    page, text = _page(out / "runs" / "lg_s0" / "report.html")
    assert page.sections[-len(TASKS):] == [f"task-{t}" for t in TASKS]
    assert "text_to_image: generated samples" in text and "grounding: predicted vs true boxes" in text
    assert 'class="missing"' not in text


def test_the_generation_figure_pairs_real_and_generated_images_of_samples_png(tmp_path):
    """split_pairs reads back exactly the images torchvision's grid holds."""
    from torchvision.utils import save_image

    torch.manual_seed(0)
    real, fake = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    save_image(torch.stack([real, fake], 1).flatten(0, 1), tmp_path / "samples.png", nrow=2, padding=1)
    pairs = split_pairs((tmp_path / "samples.png").read_bytes(), (8, 8))
    assert len(pairs) == 3
    as_u8 = lambda t: t.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    for (r, f), rt, ft in zip(pairs, real, fake):
        assert np.array_equal(r, as_u8(rt)) and np.array_equal(f, as_u8(ft))
    with pytest.raises(ValueError, match="not a 2-column grid of 7x8"):
        split_pairs((tmp_path / "samples.png").read_bytes(), (7, 8))


def test_view_kind_reads_what_a_result_holds():
    assert V.view_kind({"artefacts": {"samples": "s.png"}, "protocol": {"conditioning": "text"}}) == "generation"
    assert V.view_kind({"tables": {"examples": [{"generated": "a", "references": ["b"]}]}}) == "captions"
    assert V.view_kind({"tables": {"examples": [{"question": "q", "answer": "a", "predicted": "b"}]}}) == "answers"
    assert V.view_kind({"tables": {"examples": [{"box": [0, 0, 1, 1], "predicted": [0, 0, 1, 1]}]}}) == "boxes"
    assert V.view_kind({"metrics": {"psnr": 1.0}, "tables": {"usage_histogram": [1, 2]}}) is None


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
        h.update(str(path.stat().st_mtime_ns).encode())
    return h.hexdigest()


def test_tokenizers_from_evaluates_another_comparisons_models_without_training(downstream, monkeypatch):
    tmp, source = downstream
    monkeypatch.setattr(Experiment, "run", lambda self: pytest.fail("tokenizers_from must not train"))
    before = _tree_digest(source)
    extra = f"Comparison.tokenizers_from = '{source}'"
    spec = _write(tmp / "reuse.gin", "reuse", VARIANTS, ["grounding"], tmp / "cache", extra)
    gin.clear_config()
    assert cli_main(["compare", "--gin", spec, "--root", str(tmp / "out2")]) == 0
    out = tmp / "out2" / "reuse"
    assert json.loads((out / "comparison.json").read_text())["status"] == {"base_s0": "evaluated", "lg_s0": "evaluated"}
    for variant in VARIANTS:
        mine = json.loads((out / "runs" / f"{variant}_s0" / "metrics.json").read_text())
        theirs = json.loads((source / "runs" / f"{variant}_s0" / "metrics.json").read_text())
        assert mine["tokenizer_run"] == str(source / "runs" / f"{variant}_s0")
        assert mine["tokenizer_config_hash"] == theirs["gin_config_hash"] and mine["guidance"] == theirs["guidance"]
        # the same frozen tokenizer, the same task settings: the same boxes as in the source comparison
        assert mine["tasks"]["grounding"]["metrics"] == pytest.approx(theirs["tasks"]["grounding"]["metrics"])
    assert _tree_digest(source) == before  # nothing written into the other comparison
    page, _ = _page(out / "report.html")
    assert "task-grounding" in page.sections
    gin.clear_config()
    assert cli_main(["compare", "--gin", spec, "--root", str(tmp / "out2")]) == 0  # finished: reused
    assert json.loads((out / "comparison.json").read_text())["status"] == {"base_s0": "reused", "lg_s0": "reused"}


def test_tokenizers_from_refuses_other_data_and_missing_runs(downstream, monkeypatch):
    tmp, source = downstream
    monkeypatch.setattr(Experiment, "run", lambda self: pytest.fail("nothing may train"))
    extra = f"Comparison.tokenizers_from = '{source}'"
    other_data = {"base": ["tiny.gin", "LanguageGuided.enabled = False", "shapes.num_samples = 32"]}
    spec = _write(tmp / "bad.gin", "bad", other_data, ["grounding"], tmp / "cache", extra)
    gin.clear_config()
    with pytest.raises(ValueError, match=re.escape("does not match its tokenizer run") + ".*data"):
        cli_main(["compare", "--gin", spec, "--root", str(tmp / "out3")])
    wrong_guidance = {"base": ["tiny.gin"]}  # the guided configuration pointed at the unguided run
    spec = _write(tmp / "bad2.gin", "bad2", wrong_guidance, ["grounding"], tmp / "cache", extra)
    gin.clear_config()
    with pytest.raises(ValueError, match="guidance: variant True vs run False"):
        cli_main(["compare", "--gin", spec, "--root", str(tmp / "out3")])
    spec = _write(tmp / "bad3.gin", "bad3", {"nope": ["tiny.gin"]}, ["grounding"], tmp / "cache", extra)
    gin.clear_config()
    with pytest.raises(FileNotFoundError, match="no finished tokenizer run for 'nope' seed 0"):
        cli_main(["compare", "--gin", spec, "--root", str(tmp / "out3")])
    assert not (tmp / "out3").exists()  # refused before anything ran


@pytest.mark.skipif(browser_check.chromium() is None, reason="Debian's chromium is not installed")
def test_downstream_comparison_report_in_headless_chromium(downstream, tmp_path):
    _, out = downstream
    seen, console = browser_check.inspect(out / "report.html", tmp_path)
    assert [s["id"] for s in seen["sections"]][3:-1] == [f"task-{t}" for t in TASKS]
    assert not [s for s in seen["sections"] if s["missing"]]
    assert seen["images"] and all(i["naturalWidth"] > 0 and i["inline"] for i in seen["images"])
    assert seen["errors"] == [] and console == []
