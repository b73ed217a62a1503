"""gin files: resolution (path, bundled, error listing), error reporting, and a dry parse
of every .gin file in the repository so no config rots."""

from __future__ import annotations

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
