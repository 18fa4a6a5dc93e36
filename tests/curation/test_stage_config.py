"""Typed config: a bad key, type, range or choice stops at load with the field's name."""

from __future__ import annotations

import pytest

from curation.config import ConfigError, load_config, parse_skip


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_load_and_hashes_split_scoring_from_thresholds():
    a = load_config(None)
    b = load_config(None, {"thresholds.clip.min_score": 0.3})
    assert a.score_hash(()) == b.score_hash(())
    assert a.threshold_hash() != b.threshold_hash()
    assert a.score_hash(()) != a.score_hash(("clip",))


@pytest.mark.parametrize("text, needle", [
    ("thresholds:\n  entropy:\n    min_entrpy: 2\n", "thresholds.entropy.min_entrpy: unknown field (did you mean 'thresholds.entropy.min_entropy'?)"),
    ("scoring:\n  clipp: {}\n", "scoring.clipp: unknown field (did you mean 'scoring.clip'?)"),
    ("thresholds:\n  nsfw:\n    max_score: 1.5\n", "thresholds.nsfw.max_score = 1.5 is out of range"),
    ("thresholds:\n  dedup:\n    max_hamming: 'six'\n", "thresholds.dedup.max_hamming: expected an integer"),
    ("thresholds:\n  rotation:\n    action: flip\n", "thresholds.rotation.action = 'flip'"),
    ("scoring:\n  store_image: yes\n", "scoring.store_image: expected a string"),
    ("thresholds:\n  token_length:\n    min_tokens: 10\n    max_tokens: 5\n", "min_tokens must be <= max_tokens"),
    ("- a list\n", "must hold a mapping of config fields, got list"),
    ("scoring:\n  rotation:\n    detector: magic\n", "scoring.rotation.detector = 'magic'"),
])
def test_bad_config_names_the_field(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert needle in str(e.value)


def test_missing_config_file_names_flag(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(tmp_path / "nope.yaml")


def test_skip_names_are_checked():
    assert parse_skip("nsfw, clip") == ("clip", "nsfw")
    with pytest.raises(ConfigError, match="--skip: unknown filter 'clp'"):
        parse_skip("clp")
    with pytest.raises(ConfigError, match="unknown filter 'broken'"):
        parse_skip("broken")
