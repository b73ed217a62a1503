"""RefCOCO through the plain-data unpickler: boxes moved with the image, and malicious
pickles refused before anything they name runs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from lgvq_plugins import api
from lgvq_plugins.data.safe_pickle import UnsafePickleError, load_plain, loads_plain
from data_fixtures import refcoco_tree


class _RunsCode:
    """Unpickling this calls os.system (what a malicious refs file would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))  # a builtin, but not a container


def test_plain_data_round_trips_every_protocol():
    data = [{"a": (1, 2.5, None, True), "b": {"x", "y"}, "c": b"raw", "d": frozenset([1])}, "text", 10**30]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert loads_plain(pickle.dumps(data, protocol=protocol)) == data


@pytest.mark.parametrize("payload", ["system", "eval", "class"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    obj = {"system": _RunsCode(f"touch {marker}"), "eval": _Evals(), "class": torch.nn.Linear}[payload]
    blob = pickle.dumps([{"ref_id": 0, "sentences": [obj]}], protocol=2)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError) as err:
        load_plain(path)
    assert str(path) in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()
    if payload == "system":  # the payload is live: plain pickle.loads would have run it
        pickle.loads(blob)
        assert marker.exists()


def test_refcoco_refuses_a_malicious_refs_file(tmp_path):
    root = refcoco_tree(tmp_path / "rc")
    marker = tmp_path / "pwned"
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_RunsCode(f"touch {marker}")], protocol=2))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        api.create_dataset("refcoco", root=str(root), split="train", size=32)
    assert not marker.exists()


def test_refcoco_samples_and_boxes(tmp_path):
    root = refcoco_tree(tmp_path / "rc")
    val = api.create_dataset("refcoco", root=str(root), split="val", size=20)
    s = val[0]
    # 80×40 → 40×20 (scale 0.5), center crop x 10..30; box (40,0,80,40) → (20,0,40,20) → (10,0,20,20)
    assert s["image"].shape == (3, 20, 20) and s["refexp"] == s["caption"] == "the thing 1"
    assert torch.allclose(s["box"], torch.tensor([10.0, 0.0, 20.0, 20.0]))
    assert "_box" not in s and s["ref_id"] == 1
    test = api.create_dataset("refcoco", root=str(root), split="test", size=20)
    assert len(test) == 1 and torch.allclose(test[0]["box"], torch.tensor([0.0, 5.0, 0.0, 9.0]))  # cropped away in x
    train = api.create_dataset("refcoco", root=str(root), split="train", size=40, flip=True)
    boxes = {tuple(train[0]["box"].tolist()) for _ in range(30)}
    assert boxes == {(10.0, 5.0, 30.0, 15.0), (50.0, 5.0, 70.0, 15.0)} or len(boxes) > 1  # crops/flips move it
    for b in boxes:
        assert 0 <= b[0] <= b[2] <= 40 and b[2] - b[0] <= 20.0 + 1e-6


def test_refcoco_unknown_split_lists_the_splits(tmp_path):
    root = refcoco_tree(tmp_path / "rc")
    with pytest.raises(ValueError, match=r"\['testA', 'train', 'val'\]"):
        api.create_dataset("refcoco", root=str(root), split="testB", size=20)
