"""Settings load from TOML by one function; unknown keys and bad files are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfembed import DEFAULT_CATALOG, ConfigError, RateLimits, load_settings

CONFIGS = Path(__file__).parent.parent / "configs"


JOBS = sorted(p for p in CONFIGS.glob("*.toml") if p.name != "prices.toml")


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    settings = load_settings(path)
    assert settings.model in DEFAULT_CATALOG


def test_overrides_win_and_nested_tables_build() -> None:
    settings = load_settings(CONFIGS / "bge-m3.toml", concurrency=3)
    assert settings.concurrency == 3
    assert settings.rate == RateLimits(rpm=2000, tpm=500_000, window_s=60.0)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[rate]\nrpx = 3\n")
    with pytest.raises(ConfigError, match="rpx"):
        load_settings(path)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("model = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(path)
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "missing.toml")


def test_burst_default_stays_within_headroom() -> None:
    limits = RateLimits(window_s=60.0, headroom=0.02)
    assert limits.burst_allowance_s == pytest.approx(0.6)
    assert RateLimits(burst_s=2.0).burst_allowance_s == 2.0


def test_user_models_extend_the_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models."Org/new"]\nmax_input_tokens = 100\ndefault_dimensions = 8\n'
        '[models."BAAI/bge-m3"]\nmax_input_tokens = 4096\n'
    )
    catalog = DEFAULT_CATALOG.load(path)
    assert catalog["Org/new"].default_dimensions == 8
    assert catalog["BAAI/bge-m3"].max_input_tokens == 4096
    assert catalog["BAAI/bge-m3"].default_dimensions == 1024
    with pytest.raises(ConfigError, match="unknown model"):
        DEFAULT_CATALOG["Org/other"]
    path.write_text('[models."Org/bad"]\nmax_input_tokens = 10\n')
    with pytest.raises(ConfigError, match="Org/bad"):
        DEFAULT_CATALOG.load(path)


def test_catalogue_has_the_nine_reference_models() -> None:
    assert len(DEFAULT_CATALOG) == 9
    vl = DEFAULT_CATALOG["Qwen/Qwen3-VL-Embedding-8B"]
    assert vl.accepts_images
    assert vl.dimensions[-1] == 4096
    assert DEFAULT_CATALOG["Qwen/Qwen3-Embedding-0.6B"].dimensions[-1] == 1024
    assert not DEFAULT_CATALOG["BAAI/bge-large-zh-v1.5"].accepts_dimensions
    assert DEFAULT_CATALOG["netease-youdao/bce-embedding-base_v1"].default_dimensions == 768
