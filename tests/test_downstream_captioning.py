"""``captioning``: scores agree with pycocoevalcap run directly; end to end on a
tiny ``shapes`` split."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lgvq_plugins.tasks.captioning import Vocabulary, caption_scores

import gin
from lgvq_plugins import api
from lgvq_plugins.evaluation.task import run_tasks

pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java")

REFS = {1: ["A red circle left of a blue square.", "a blue square and a red circle"],
        2: ["Two green triangles.", "two small green triangles"],
        3: ["a white cross above a purple diamond"]}
HYPS = {1: "a red circle left of a square", 2: "two green triangles", 3: "a purple diamond below a cross"}


def _direct(meteor: bool):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    refs = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    hyps = tok.tokenize({k: [{"caption": v}] for k, v in HYPS.items()})
    out = {"bleu_4": Bleu(4).compute_score(refs, hyps, verbose=0)[0][3], "rouge_l": Rouge().compute_score(refs, hyps)[0],
           "cider": Cider().compute_score(refs, hyps)[0]}
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = Meteor().compute_score(refs, hyps)[0]
    return out


@needs_java
def test_scores_agree_with_pycocoevalcap_run_directly():
    ours, unavailable = caption_scores(REFS, HYPS, meteor=False)
    direct = _direct(meteor=False)
    for name, value in direct.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["bleu_4"] < 1 and 0 < ours["rouge_l"] < 1 and ours["cider"] > 0
    assert ours["spice"] is None and "CoreNLP" in unavailable["spice"]
    assert ours["meteor"] is None and "meteor" in unavailable


@needs_java
def test_a_perfect_caption_scores_bleu_1():
    scores, _ = caption_scores({1: ["a red circle"], 2: ["a blue square"]}, {1: "a red circle", 2: "a blue square"},
                               meteor=False)
    assert scores["bleu_1"] == pytest.approx(1.0, abs=1e-6) and scores["rouge_l"] == pytest.approx(1.0)


@pytest.mark.slow
@needs_java
def test_meteor_agrees_with_pycocoevalcap_run_directly():
    ours, _ = caption_scores(REFS, HYPS, meteor=True)
    assert ours["meteor"] == pytest.approx(_direct(meteor=True)["meteor"], abs=1e-9)


def test_vocabulary_round_trip_and_unknown_words():
    vocab = Vocabulary(["a red circle", "a blue circle"])
    assert vocab.words[4:] == ["a", "circle", "blue", "red"]  # by frequency, then alphabetical
    ids = vocab.encode(["A red circle!", "a green circle"], 5)
    assert ids.tolist() == [[4, 7, 5, 2, 0], [4, 3, 5, 2, 0]]
    assert vocab.decode(ids) == ["a red circle", "a circle"]  # unknown words are dropped
    assert vocab.encode(["a a a a a a"], 3).tolist() == [[4, 4, 2]]  # cut, end token kept


@needs_java
def test_captioning_end_to_end(tmp_path):
    api.list_tasks()  # load the plugins, so gin knows the registered names
    gin.parse_config([f"lgvq.task.captioning.{k}" for k in (
        "train_images = 24", f"cache_dir = '{tmp_path / 'cache'}'", "batch_size = 4", "max_images = 6",
        "meteor = False")] + ["second_stage_training.steps = 6", "second_stage_training.batch_size = 4",
                              "CodeGPT.width = 32", "CodeGPT.depth = 1", "CodeGPT.heads = 2"])
    torch.manual_seed(0)
    tok = api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                              attn_resolutions=(), z_channels=8, embed_dim=8, quantizer_config={"num_codes": 32},
                              disc_ndf=8, disc_n_layers=1).eval()
    data = api.create_dataset("shapes", split="test", size=32, num_samples=8)
    r = run_tasks(tok, data, ["captioning"], tmp_path / "eval")["captioning"]
    for name in ("bleu_4", "rouge_l", "cider"):
        assert r.metrics[name] is not None and r.metrics[name] >= 0, name
    assert r.metrics["meteor"] is None and r.metrics["spice"] is None
    examples = json.loads((tmp_path / "eval" / "captioning" / r.artefacts["captions"]).read_text())
    assert len(examples) == 6 and examples[0]["references"] == data.captions(0)
    assert r.protocol["captioner"]["train_images"] == 24
