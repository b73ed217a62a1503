"""``lgvq compare``: the table's arithmetic, and a tiny comparison (2 variants × 2 seeds, one
step each) trained, tabulated, reused without retraining, and retrained only where changed."""

from __future__ import annotations

import csv
import io
import json
import math

import browser_check
import fake_tasks
import pytest

import gin
from lgvq_plugins.cli import main as cli_main
from lgvq_plugins.evaluation import compare as C
from lgvq_plugins.training.experiment import Experiment


def test_summarise_is_mean_and_sample_std():
    assert C.summarise([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert C.summarise([5.0]) == (5.0, 0.0, 1)
    mean, std, n = C.summarise([None, float("nan"), 4.0, 6.0])  # unavailable values are left out
    assert (mean, n) == (5.0, 2) and std == pytest.approx(math.sqrt(2))
    assert C.summarise([None])[2] == 0


def test_table_markdown_and_csv():
    def m(psnr, lpips=None):
        return {"val_psnr": psnr, "val_protocol": {"split": "val"},
                "tasks": {"rec": {"metrics": {"lpips": lpips}, "protocol": {"images": 8},
                                  "unavailable": {"lpips": "no weights"} if lpips is None else {}}}}

    table = C.build_table({"base": [m(10.0), m(12.0)], "lg": [m(11.0, 0.5), m(11.0, 0.7)]})
    md = C.table_markdown(table, ["base", "lg"], [0, 1])
    assert "| val_psnr | 11 ± 1.414 | 11 ± 0 | split=val |" in md
    assert "| rec/lpips | n/a | 0.6 ± 0.1414 | images=8 |" in md
    rows = list(csv.DictReader(io.StringIO(C.table_csv(table, ["base", "lg"]))))
    psnr = next(r for r in rows if r["metric"] == "val_psnr")
    assert float(psnr["base_mean"]) == 11.0 and float(psnr["base_std"]) == pytest.approx(math.sqrt(2))
    assert psnr["base_n"] == "2" and psnr["protocol"] == "split=val"
    lpips = next(r for r in rows if r["metric"] == "rec/lpips")
    assert lpips["base_mean"] == "" and lpips["base_n"] == "0"


def test_split_spec():
    assert C.split_spec(["cvq.gin", "MAX_STEPS = 3"]) == (["cvq.gin"], ["MAX_STEPS = 3"])
    assert C.split_spec("cvq.gin") == (["cvq.gin"], [])


def _write_comparison(tmp_path, variants: dict, extra: str = "") -> str:
    path = tmp_path / "cmp.gin"
    path.write_text(f"""
Comparison.name = 'tiny_cmp'
Comparison.variants = {variants!r}
Comparison.seeds = [0, 1]
Comparison.tasks = ['count_codes']
Comparison.bindings = ['MAX_STEPS = 1', 'LanguageGuided.enabled = False', 'Trainer.val_every = 0',
                       'Trainer.ckpt_every = 0', 'Experiment.report = False', 'Experiment.eval_batches = 1']
{extra}
""")
    return str(path)


VARIANTS = {"k32": ["tiny.gin"], "k16": ["tiny.gin", "NUM_CODES = 16"]}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    with fake_tasks.registered():
        gin.clear_config()
        assert cli_main(["compare", "--gin", _write_comparison(tmp, VARIANTS), "--root", str(tmp / "out")]) == 0
        gin.clear_config()
        yield tmp
    gin.clear_config()


def test_compare_trains_every_variant_and_seed_and_writes_the_table(comparison):
    out = comparison / "out" / "tiny_cmp"
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["status"] == {"k32_s0": "trained", "k16_s0": "trained", "k32_s1": "trained", "k16_s1": "trained"}
    for run in summary["status"]:
        metrics = json.loads((out / "runs" / run / "metrics.json").read_text())
        assert metrics["name"] == run and "count_codes" in metrics["tasks"]
    seeds = [json.loads((out / "runs" / f"k16_s{s}" / "metrics.json").read_text()) for s in (0, 1)]
    values = [m["tasks"]["count_codes"]["metrics"]["usage"] for m in seeds]
    mean, std, n = summary["table"]["count_codes/usage"]["k16"]
    assert n == 2 and mean == pytest.approx(sum(values) / 2) and std == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    md = (out / "comparison.md").read_text()
    assert "| metric | k32 | k16 | protocol |" in md and "count_codes/usage" in md
    # one histogram per variant has K entries: the variants really differ in NUM_CODES
    assert len(seeds[0]["tasks"]["count_codes"]["tables"]["usage_histogram"]) == 16
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))
    assert {"k32_mean", "k32_std", "k32_n", "k16_mean"} <= set(rows[0])


def test_compare_reuses_finished_runs_and_retrains_only_what_changed(comparison, monkeypatch):
    trained = []
    original = Experiment.run

    def spy(self):
        trained.append(self.name)
        return original(self)

    monkeypatch.setattr(Experiment, "run", spy)
    root = str(comparison / "out")
    with fake_tasks.registered():
        gin.clear_config()
        cli_main(["compare", "--gin", _write_comparison(comparison, VARIANTS), "--root", root])
        assert trained == []  # nothing retrained
        changed = {**VARIANTS, "k16": ["tiny.gin", "NUM_CODES = 16", "Trainer.base_lr = 2e-4"]}
        gin.clear_config()
        cli_main(["compare", "--gin", _write_comparison(comparison, changed), "--root", root])
    assert sorted(trained) == ["k16_s0", "k16_s1"]
    status = json.loads((comparison / "out" / "tiny_cmp" / "comparison.json").read_text())["status"]
    assert status == {"k32_s0": "reused", "k16_s0": "trained", "k32_s1": "reused", "k16_s1": "trained"}


def test_compare_refuses_variants_that_see_other_data(tmp_path, monkeypatch):
    monkeypatch.setattr(Experiment, "run", lambda self: pytest.fail("nothing may train"))
    variants = {"a": ["tiny.gin"], "b": ["tiny.gin", "shapes.num_samples = 32"]}
    with pytest.raises(ValueError, match=r"variant 'b' sees other data than 'a'.*same_data = False"):
        cli_main(["compare", "--gin", _write_comparison(tmp_path, variants), "--root", str(tmp_path)])


@pytest.mark.skipif(browser_check.chromium() is None, reason="Debian's chromium is not installed")
def test_comparison_report_in_headless_chromium(comparison, tmp_path):
    seen, console = browser_check.inspect(comparison / "out" / "tiny_cmp" / "report.html", tmp_path)
    assert [s["id"] for s in seen["sections"]] == ["summary", "comparison", "figures", "runs"]
    assert seen["images"] and all(i["naturalWidth"] > 0 and i["inline"] for i in seen["images"])
    assert seen["errors"] == [] and console == []
