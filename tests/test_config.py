"""Settings load from TOML by one function; unknown keys, bad files and values not allowed are
clear errors, wherever the settings come from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sfembed import (
    DEFAULT_CATALOG,
    BatchLimits,
    ConfigError,
    IOSettings,
    RateLimits,
    RetryPolicy,
    Timeouts,
    embed,
    load_settings,
)
from sfembed._config import model_spec, with_options

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
    path.write_bytes(b'model = "BAAI/bge-m3" # \xe9t\xe9, saved as Latin-1\n')
    with pytest.raises(ConfigError, match=r"broken\.toml': not UTF-8 text \(byte 24\)"):
        load_settings(path)


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


@pytest.mark.parametrize(
    ("table", "named"),
    [
        (
            'max_input_tokens = "a"\ndefault_dimensions = 8',
            r"max_input_tokens = 'a' is not allowed",
        ),
        ("max_input_tokens = 9\ndefault_dimensions = 8\nfoo = 1", r"unknown key\(s\) foo; known"),
        ("max_input_tokens = 9", r"give its max_input_tokens and default_dimensions"),
        (
            "max_input_tokens = 9\ndefault_dimensions = 8\ndimensions = 8",
            r"dimensions = 8 .*a list",
        ),
        (
            "max_input_tokens = 9\ndefault_dimensions = 8\nspecial_tokens = -1",
            r"special_tokens = -1",
        ),
        (
            'max_input_tokens = 9\ndefault_dimensions = 8\naccepts_dimensions = "yes"',
            r"true or false",
        ),
    ],
)
def test_a_models_table_not_allowed_names_the_file_the_model_and_the_key(
    tmp_path: Path, table: str, named: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(f'[models."Org/new"]\n{table}\n')
    with pytest.raises(ConfigError, match=r"config '.*job\.toml': model 'Org/new'.*" + named):
        load_settings(path)


def test_catalogue_has_the_nine_reference_models() -> None:
    assert len(DEFAULT_CATALOG) == 9
    vl = DEFAULT_CATALOG["Qwen/Qwen3-VL-Embedding-8B"]
    assert vl.accepts_images
    assert vl.dimensions[-1] == 4096
    assert DEFAULT_CATALOG["Qwen/Qwen3-Embedding-0.6B"].dimensions[-1] == 1024
    assert not DEFAULT_CATALOG["BAAI/bge-large-zh-v1.5"].accepts_dimensions
    assert DEFAULT_CATALOG["netease-youdao/bce-embedding-base_v1"].default_dimensions == 768


# -- values checked where they enter ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            {"long_mode": "chunk"},
            r"long_mode = 'chunk' is not allowed: use one of 'pool', 'chunks'",
        ),
        ({"encoding_format": "Base64"}, r"encoding_format = 'Base64'.*'float', 'base64'"),
        ({"truncate_side": "Left"}, r"truncate_side = 'Left'.*'left', 'right'"),
        ({"concurrency": 0}, r"concurrency = 0 is not allowed: a whole number from 1 to 10000"),
        ({"concurrency": 2.5}, r"concurrency = 2\.5"),
        ({"concurrency": True}, r"concurrency = True"),
        ({"overlap_tokens": -5}, r"overlap_tokens = -5 is not allowed: a whole number 0 or more"),
        ({"dimensions": 0}, r"dimensions = 0"),
        ({"model": ""}, r"model = ''"),
        ({"allow_insecure_http": "yes"}, r"allow_insecure_http = 'yes'.*true or false"),
        ({"rate": {"tpm": 5}}, r"rate = \{'tpm': 5\} is not allowed: a RateLimits"),
    ],
)
def test_a_setting_not_allowed_names_key_value_and_what_is_allowed(
    overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: RateLimits(tpm=0), r"rate\.tpm = 0"),
        (
            lambda: RateLimits(window_s=-1.0),
            r"rate\.window_s = -1\.0 is not allowed: a finite number more than 0",
        ),
        (lambda: RateLimits(window_s=float("inf")), r"rate\.window_s = inf.*a finite number"),
        (lambda: Timeouts(grace_s=float("inf")), r"timeouts\.grace_s = inf.*a finite number"),
        (lambda: RateLimits(headroom=0.5), r"rate\.headroom = 0\.5.*0 or more and less than 0\.5"),
        (lambda: RateLimits(window_s=float("nan")), r"rate\.window_s = nan"),
        (lambda: RetryPolicy(max_attempts=0), r"retry\.max_attempts = 0"),
        (lambda: Timeouts(read_s=0), r"timeouts\.read_s = 0"),
        (lambda: BatchLimits(max_items=0), r"batch\.max_items = 0"),
        (lambda: IOSettings(dtype="float64"), r"io\.dtype = 'float64'.*'float32', 'float16'"),  # type: ignore[arg-type]
        (lambda: IOSettings(checkpoint_rows=-1), r"io\.checkpoint_rows = -1"),
    ],
)
def test_every_table_checks_its_values(make: Callable[[], object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        make()


def test_a_value_not_allowed_in_a_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('long_mode = "chunk"\n[batch]\nmax_items = 8\n')
    with pytest.raises(ConfigError, match=r"job\.toml.*long_mode = 'chunk'"):
        load_settings(path)
    path.write_text("[batch]\nmax_items = -1\n")
    with pytest.raises(ConfigError, match=r"job\.toml.*batch\.max_items = -1"):
        load_settings(path)
    path.write_text("[rate]\nwindow_s = inf\n")  # TOML's own infinity
    with pytest.raises(ConfigError, match=r"job\.toml.*rate\.window_s = inf is not allowed"):
        load_settings(path)
    path.write_text('rate = "fast"\n')
    with pytest.raises(ConfigError, match=r"job\.toml.*rate: must be a table"):
        load_settings(path)


def test_options_are_checked_like_settings() -> None:
    settings = load_settings()
    assert with_options(settings, concurrency=4).concurrency == 4
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) concurency; known: .*concurrency"):
        with_options(settings, concurency=4)
    with pytest.raises(ConfigError, match="concurrency = 0"):
        dataclasses.replace(settings, concurrency=0)  # what the command line does with its flags


async def test_embed_refuses_a_bad_option_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="long_mode = 'chunk'"):
        await embed(
            ["a"], model="BAAI/bge-m3", long_mode="chunk", api_key_env="SFEMBED_NO_SUCH_KEY"
        )
    with pytest.raises(ConfigError, match="errors = 'ignore'"):
        await embed(["a"], model="BAAI/bge-m3", errors="ignore")  # type: ignore[arg-type]


def test_an_unknown_model_is_a_config_error_and_a_missing_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'Org/none'.*max_input_tokens"):
        DEFAULT_CATALOG["Org/none"]
    with pytest.raises(KeyError):
        DEFAULT_CATALOG["Org/none"]
    assert DEFAULT_CATALOG.get("Org/none") is None
    assert model_spec(load_settings(model="BAAI/bge-m3")).max_input_tokens == 8192
