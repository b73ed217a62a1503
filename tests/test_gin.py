"""gin files: resolution (path, bundled, error listing), error reporting, and a dry parse
of every .gin file in the repository so no config rots."""

from __future__ import annotations

import re
from pathlib import Path

import gin
import pytest

from lgvq_plugins.config import bundled_configs, bundled_gin_dir, parse_gin, resolve_gin_file

REPO = Path(__file__).resolve().parent.parent
ALL_GIN_FILES = sorted(p.relative_to(REPO).as_posix()
                       for folder in ("gin", "examples", "benchmarks") for p in (REPO / folder).rglob("*.gin"))


def test_existing_path_wins(tmp_path, monkeypatch):
    local = tmp_path / "gin" / "cvq_lg.gin"
    local.parent.mkdir()
    local.write_text("# local copy\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_gin_file("gin/cvq_lg.gin") == Path("gin/cvq_lg.gin")


def test_bundled_lookup_with_or_without_gin_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing here, so only the bundled folder can answer
    bundled = bundled_configs()
    if not bundled:
        pytest.skip("no bundled gin files yet")
    name = bundled[0]
    assert resolve_gin_file(name) == bundled_gin_dir() / name
    assert resolve_gin_file(f"gin/{name}") == bundled_gin_dir() / name


def test_missing_gin_file_lists_bundled_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        resolve_gin_file("no_such_config.gin")
    message = str(err.value)
    assert "no_such_config.gin" in message and "Bundled configs" in message
    for name in bundled_configs():
        assert name in message


def test_bad_binding_reports_file_and_line(tmp_path):
    config = tmp_path / "bad.gin"
    config.write_text("# a comment\n\nnot_a_registered_thing.value = 3\n")
    with pytest.raises(ValueError) as err:
        parse_gin([config])
    message = str(err.value)
    assert "not_a_registered_thing" in message
    assert "bad.gin" in message and "3" in message  # file and line number


def test_syntax_error_reports_file_and_line(tmp_path):
    config = tmp_path / "broken.gin"
    config.write_text("vq.num_codes = 12\nvq.beta = = 0.3\n")
    with pytest.raises(SyntaxError) as err:
        parse_gin([config])
    assert err.value.filename.endswith("broken.gin") and err.value.lineno == 2


@pytest.mark.parametrize("path", ALL_GIN_FILES)
def test_every_gin_file_parses(path):
    """Dry-parse each file after plugins load (gin.clear_config runs around every test)."""
    parse_gin([REPO / path])
    assert gin.config_str() is not None


# ---------------------------------------------------------------------------------------
# Run files compose blocks (t5x style)
# ---------------------------------------------------------------------------------------

GIN = REPO / "gin"
RUN_FILES = sorted(p.name for p in GIN.glob("*.gin"))  # top level: run files; folders: blocks
INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)


def _includes(path: Path) -> list[str]:
    return INCLUDE.findall(path.read_text())


def test_the_documented_run_files_exist():
    assert {"cvq_lg.gin", "cvq.gin", "vqgan.gin", "vqgan_lg.gin", "vqvae.gin", "vqvae_lg.gin",
            "tiny.gin"} <= set(RUN_FILES)


@pytest.mark.parametrize("path", sorted(p.relative_to(GIN).as_posix() for p in GIN.rglob("*.gin")))
def test_no_gin_file_includes_a_run_file(path):
    """Run files include blocks only; a variant is a new run file, not an override of one."""
    for included in _includes(GIN / path):
        assert "/" in included and (GIN / included).is_file(), (
            f"gin/{path} includes {included!r}, which is a run file (or missing): include blocks "
            f"from gin/<folder>/ instead")


def test_no_two_gin_files_share_a_name():
    """``include 'cvq.gin'`` must never depend on which search path answers first."""
    seen: dict[str, list[str]] = {}
    for p in GIN.rglob("*.gin"):
        seen.setdefault(p.name, []).append(p.relative_to(REPO).as_posix())
    duplicates = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not duplicates, f"gin files sharing a name: {duplicates}; rename the block files"


def test_one_name_per_setting():
    """Bindings use the short configurable name (``shapes.size``), never the module-qualified
    one (``lgvq.dataset.shapes.size``), so a search for a setting finds every use."""
    qualified = re.compile(r"^\s*lgvq\.\w+\.\w+\.\w+\s*=", re.MULTILINE)
    offenders = [p.relative_to(REPO).as_posix() for p in GIN.rglob("*.gin") if qualified.search(p.read_text())]
    assert not offenders, f"module-qualified bindings in {offenders}; use the short name"


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_files_start_with_a_header(name):
    lines = (GIN / name).read_text().splitlines()
    header = "\n".join(line for line in lines[:next(i for i, x in enumerate(lines) if x.strip()
                                                        and not x.startswith("#"))])
    for part in ("Must be set", "Commonly overridden"):
        assert part in header, (f"gin/{name} needs a header comment saying what it runs, what must "
                                f"be set and what is commonly overridden (no {part!r})")


@pytest.mark.parametrize("name,backbone,quantizer,guided", [
    ("cvq_lg", "vqgan", "cvq", True), ("cvq", "vqgan", "cvq", False),
    ("vqgan_lg", "vqgan", "vq", True), ("vqgan", "vqgan", "vq", False),
    ("vqvae_lg", "vqvae", "vq", True), ("vqvae", "vqvae", "vq", False),
    ("tiny", "vqgan", "cvq", True),
])
def test_run_files_compose_what_their_names_say(name, backbone, quantizer, guided):
    parse_gin([GIN / f"{name}.gin"])
    assert gin.query_parameter("Experiment.name") == name
    assert gin.query_parameter("Experiment.backbone") == backbone
    assert gin.query_parameter(f"{backbone}.quantizer") == quantizer
    assert gin.query_parameter("LanguageGuided.enabled") is guided
