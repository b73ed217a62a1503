"""WUPS (``lgvq_plugins.evaluation.wups``): the Malinowski & Fritz formula on a fake
similarity (always runs), and on WordNet 3.0 through nltk where it is installed (Debian's
``wordnet-base`` + ``wordnet-sense-index``; skipped with the reason otherwise)."""

from __future__ import annotations

import pytest

from lgvq_plugins.evaluation import wups as W

# A fake similarity with hand-picked values: symmetric, unknown pairs 0.
_SIM = {frozenset(("two", "three")): 0.9, frozenset(("one", "three")): 0.875, frozenset(("red", "blue")): 0.5}


def fake(a: str, b: str) -> float:
    return _SIM.get(frozenset((a, b)), 0.0)


def test_item_measure_scales_below_the_threshold_only():
    assert W.item_measure("cat", "cat", 0.9, fake) == 1.0  # equal strings: 1, whatever the similarity
    assert W.item_measure("two", "three", 0.9, fake) == 0.9  # at the threshold: kept
    assert W.item_measure("one", "three", 0.9, fake) == pytest.approx(0.0875)  # below: × 0.1
    assert W.item_measure("one", "three", 0.0, fake) == 0.875  # @0.0 never scales
    assert W.item_measure("one", "red", 0.9, fake) == 0.0


def test_wups_pair_is_the_min_over_directions_of_products_of_best_matches():
    # identical answers (sets: order and repeats do not matter)
    assert W.wups_pair("red, blue", "blue,red", 0.9, fake) == 1.0
    assert W.wups_pair("red", "red, red", 0.9, fake) == 1.0
    # truth {one, two}, predicted {three}: truth→pred 0.875 × 0.9; pred→truth max(0.875, 0.9) = 0.9
    assert W.wups_pair("one, two", "three", 0.0, fake) == pytest.approx(min(0.875 * 0.9, 0.9))
    # @0.9 'one'~'three' is scaled: truth→pred 0.0875 × 0.9, pred→truth 0.9
    assert W.wups_pair("one, two", "three", 0.9, fake) == pytest.approx(0.0875 * 0.9)
    # one item without any match zeroes its direction's product
    assert W.wups_pair("red, cat", "red", 0.0, fake) == 0.0
    assert W.answer_items(" chair ,table") == ["chair", "table"]


def test_wups_is_the_mean_over_questions():
    predicted, truth = ["two", "three", "red", "cat"], ["two", "one", "blue", "dog"]
    assert W.wups(predicted, truth, 0.0, fake) == pytest.approx((1 + 0.875 + 0.5 + 0) / 4)
    assert W.wups(predicted, truth, 0.9, fake) == pytest.approx((1 + 0.0875 + 0.05 + 0) / 4)
    with pytest.raises(ValueError, match="equally many"):
        W.wups(["a"], ["a", "b"], 0.9, fake)


def test_lexnames_is_wordnet_30s_list():
    lines = W.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"


def test_without_wordnet_wups_is_unavailable_never_zero(tmp_path):
    metrics, unavailable, protocol = W.wups_scores(["red"], ["red"], wordnet_dir=tmp_path / "nowhere",
                                                   cache_dir=tmp_path / "cache")
    assert metrics == {"wups_0.9": None, "wups_0.0": None}
    assert "WordNet not found" in unavailable["wups_0.9"] and "wordnet-base" in unavailable["wups_0.0"]
    assert str(tmp_path / "nowhere") in unavailable["wups_0.9"]
    assert protocol == {}


def test_wordnet_dir_setting_and_princeton_layout(tmp_path, monkeypatch):
    (tmp_path / "wn" / "dict").mkdir(parents=True)
    (tmp_path / "wn" / "dict" / "data.noun").write_text("")
    monkeypatch.setenv(W.WORDNET_ENV, str(tmp_path / "wn"))
    assert W.wordnet_source() == tmp_path / "wn" / "dict"
    assert W.wordnet_source(tmp_path / "x") == tmp_path / "x"  # the argument wins over the variable
    monkeypatch.delenv(W.WORDNET_ENV)
    assert str(W.wordnet_source()) == "/usr/share/wordnet"


# ---------------------------------------------------------------------------------------
# On WordNet 3.0 (where installed)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wn_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("wn-cache")


@pytest.fixture(scope="module")
def wordnet(wn_cache):
    try:
        return W.load_wordnet(cache_dir=wn_cache)
    except W.WordNetUnavailable as exc:
        pytest.skip(f"WordNet unavailable: {exc}")


def test_reader_is_wordnet_30_with_the_generated_lexnames(wordnet):
    assert wordnet.get_version() == "3.0"
    assert wordnet.synset("dog.n.01").lexname() == "noun.animal"
    assert wordnet.synset("walk.v.01").lexname() == "verb.motion"
    assert wordnet.synset("red.n.01").lexname() == "noun.attribute"


def test_wu_palmer_of_known_pairs(wordnet):
    dog, cat = wordnet.synset("dog.n.01"), wordnet.synset("cat.n.01")
    # nltk's WordNet how-to: dog.wup_similarity(cat) == 0.857... (WordNet 3.0)
    assert dog.wup_similarity(cat) == pytest.approx(0.8571428571428571)
    sim = W.WupSimilarity(wordnet)
    direct = max(x.wup_similarity(y) for x in wordnet.synsets("dog", "n") for y in wordnet.synsets("cat", "n"))
    assert sim("dog", "cat") == direct == pytest.approx(6 / 7)
    assert sim("car", "automobile") == 1.0  # synonyms share a synset
    assert sim("two", "three") == pytest.approx(0.9) and sim("one", "three") == pytest.approx(0.875)
    assert sim("dog", "xqzzy") == 0.0  # no noun synset
    assert sim("cook", "bake") == 0.0  # nouns only, as the reference: the verbs would give 0.857


def test_wups_on_wordnet(wordnet, wn_cache):
    predicted, truth = ["dog", "three", "three", "car"], ["dog", "two", "one", "automobile"]
    metrics, unavailable, protocol = W.wups_scores(predicted, truth, cache_dir=wn_cache)
    assert unavailable == {}
    # dog=dog: 1; two~three 0.9 (kept at @0.9); one~three 0.875 (× 0.1 at @0.9); synonyms 1
    assert metrics["wups_0.9"] == pytest.approx((1 + 0.9 + 0.0875 + 1) / 4)
    assert metrics["wups_0.0"] == pytest.approx((1 + 0.9 + 0.875 + 1) / 4)
    assert protocol["wordnet"]["version"] == "3.0"
    assert W.wups_scores(truth, truth, cache_dir=wn_cache)[0] == {"wups_0.9": 1.0, "wups_0.0": 1.0}
    assert len(list((wn_cache / "wordnet").iterdir())) == 1  # the reader folder is built once
