"""Options: a mistyped or misplaced value is refused with exit 2 and a message that names the
option and what is allowed, never with a traceback, and never echoing a key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import KEY, KEY_ENV, assert_clean, docs, embed_args, sfembed, write_lines

from sfembed._cli import main
from sfembed.testing import LocalServer

SECRET = "sk-hostile-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "in.jsonl", docs(3))


def _run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path | str, *extra: str
) -> tuple[int, str]:
    code = main(["embed", str(source), "--out", str(tmp_path / "o.npy"), "--no-progress", *extra])
    printed = capsys.readouterr()
    return code, printed.out + printed.err


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--long", "chunk", "pool"),
        ("--encoding", "hex", "base64"),
        ("--truncate-side", "middle", "right"),
        ("--dtype", "float64", "float16"),
        ("--format", "csv", "parquet"),
        ("--input-format", "xml", "jsonl"),
    ],
)
def test_a_mistyped_choice_exits_2_naming_the_allowed_values(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    source: Path,
    flag: str,
    value: str,
    allowed: str,
) -> None:
    code, printed = _run(capsys, tmp_path, source, "--local", flag, value)
    assert code == 2
    assert flag in printed
    assert value in printed
    assert allowed in printed
    assert "Traceback" not in printed
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize(
    "extra", [["--concurrency", "many"], ["--no-such-flag"], ["--tpm"]], ids=str
)
def test_other_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path, extra: list[str]
) -> None:
    code, printed = _run(capsys, tmp_path, source, "--local", *extra)
    assert code == 2
    assert "usage:" in printed


@pytest.mark.parametrize(
    "extra", [["--no-cach"], ["--conc", "4"], ["--tp", "1000"], ["--no-prog"]], ids=str
)
def test_an_option_cut_short_is_not_taken_for_the_whole_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path, extra: list[str]
) -> None:
    code, printed = _run(capsys, tmp_path, source, "--local", *extra)
    assert code == 2
    assert f"unrecognized arguments: {' '.join(extra)}" in printed
    assert not (tmp_path / "o.npy").exists()


def test_serve_does_not_take_an_option_cut_short_either(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--po", "0"]) == 2
    assert "unrecognized arguments: --po 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--concurrency", "0", "must be over 0"),
        ("--batch-size", "0", "must be over 0"),
        ("--tpm", "-5", "must be over 0"),
        ("--tpm", "1.5", "not a whole number"),
        ("--window-s", "0", "must be over 0"),
        ("--overlap-tokens", "-1", "must be at least 0"),
        ("--grace-s", "-1", "must be at least 0"),
        ("--checkpoint-rows", "0", "must be over 0"),
        ("--dimensions", "0", "must be over 0"),
        ("--window-s", "inf", "'inf' is not a finite number"),
        ("--window-s", "nan", "'nan' is not a finite number"),
        ("--grace-s", "infinity", "'infinity' is not a finite number"),
    ],
)
def test_a_count_or_time_out_of_range_exits_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    source: Path,
    flag: str,
    value: str,
    says: str,
) -> None:
    code, printed = _run(capsys, tmp_path, source, "--local", flag, value)
    assert code == 2
    assert f"argument {flag}: " in printed
    assert says in printed
    assert "Traceback" not in printed


def test_a_key_given_to_api_key_env_is_never_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path
) -> None:
    code, printed = _run(capsys, tmp_path, source, "--api-key-env", SECRET)
    assert code == 2
    assert "--api-key-env takes the name of an environment variable" in printed
    assert SECRET not in printed
    assert SECRET[3:20] not in printed


def test_an_unset_variable_that_looks_like_a_key_is_not_printed_either(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path
) -> None:
    lookalike = "abcdef0123456789abcdef0123456789"  # a valid variable name, but a key
    code, printed = _run(capsys, tmp_path, source, "--api-key-env", lookalike)
    assert code == 2
    assert "no API key" in printed
    assert lookalike not in printed


async def test_a_key_with_a_trailing_newline_works(server: LocalServer, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", docs(3))
    done = await sfembed(*embed_args(server.url, source, tmp_path / "o.npy"), key=KEY + "\n")
    assert done.code == 0, done.err
    assert_clean(done, KEY)


@pytest.mark.parametrize(
    ("url", "secret", "says"),
    [
        ("https://user:pa55word-secret@api.example.com/v1", "pa55word-secret", "credentials"),
        ("https://api.example.com/v1?token=qu3ry-secret", "qu3ry-secret", "query"),
        ("https://api.example.com/v1#fr4g-secret", "fr4g-secret", "fragment"),
    ],
)
def test_a_base_url_with_credentials_or_a_query_is_refused_without_echoing_it(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    source: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    secret: str,
    says: str,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    code, printed = _run(capsys, tmp_path, source, "--api-key-env", KEY_ENV, "--base-url", url)
    assert code == 2
    assert says in printed
    assert secret not in printed
    assert SECRET not in printed


def test_a_missing_input_with_the_progress_bar_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.jsonl"
    code = main(["embed", str(missing), "--out", str(tmp_path / "o.npy"), "--local"])
    printed = capsys.readouterr()
    assert code == 2
    assert str(missing) in printed.err
    assert "Traceback" not in printed.err
    assert list(tmp_path.iterdir()) == []  # not even a lock file


def test_an_output_under_a_regular_file_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path
) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_bytes(b"x")
    code = main(["embed", str(source), "--out", str(blocker / "o.npy"), "--local"])
    printed = capsys.readouterr()
    assert code == 2
    assert "not a folder" in printed.err
    assert blocker.read_bytes() == b"x"


def test_an_output_where_nothing_may_be_created_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], source: Path
) -> None:
    # sysfs refuses new files even to root: an honest read-only place on any Linux machine.
    code = main(["embed", str(source), "--out", "/sys/sfembed-test.npy", "--local"])
    printed = capsys.readouterr()
    assert code == 2
    assert "/sys" in printed.err
    assert "Traceback" not in printed.err


async def test_a_job_error_message_is_one_closed_sentence(server: LocalServer) -> None:
    from sfembed import EmbeddingClient, JobError, embed

    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        with pytest.raises(JobError) as raised:
            await embed(["fine", "", "  "], model="BAAI/bge-m3", client=client)
    message = str(raised.value)
    assert message == "2 input(s) could not be embedded (the first, input 1: empty text)."


def test_a_mistyped_value_in_the_config_file_exits_2_naming_key_and_values(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path
) -> None:
    config = tmp_path / "job.toml"
    config.write_text('long_mode = "chunk"\n')
    code, printed = _run(capsys, tmp_path, source, "--local", "--config", str(config))
    assert code == 2
    assert "long_mode" in printed
    assert "'chunk'" in printed
    assert "pool" in printed
    assert "Traceback" not in printed


@pytest.mark.parametrize(
    ("model", "dimensions", "says"),
    [
        ("BAAI/bge-m3", "512", "dimensions = 512 is not allowed: model BAAI/bge-m3 takes none"),
        ("Qwen/Qwen3-Embedding-8B", "100", "offers 64, 128, 256"),
    ],
)
def test_dimensions_the_model_does_not_offer_exit_2_before_any_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: str, dimensions: str, says: str
) -> None:
    source = write_lines(tmp_path / "in" / "in.jsonl", docs(3))
    out = tmp_path / "out"
    out.mkdir()
    options = ["--model", model, "--dimensions", dimensions]
    code = main(["embed", str(source), "--out", str(out / "o.npy"), "--local", *options])
    printed = capsys.readouterr().err
    assert code == 2
    assert says in printed
    assert "Traceback" not in printed
    assert list(out.iterdir()) == []  # not even a lock file


@pytest.mark.parametrize(
    ("out", "extra", "says"),
    [
        ("o.npy", ["--table", "docs"], "--table (io.table) is for LanceDB output"),
        ("o.npy", ["--format", "npy", "--table", "docs"], "--table (io.table) is for LanceDB"),
        ("o.jsonl", ["--keep-fields", "title"], "--keep-fields (io.keep_fields) is for LanceDB"),
    ],
)
def test_lance_options_for_another_output_exit_2_and_make_no_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, out: str, extra: list[str], says: str
) -> None:
    source = write_lines(tmp_path / "in" / "in.jsonl", docs(3))
    folder = tmp_path / "out"
    folder.mkdir()
    code = main(
        ["embed", str(source), "--out", str(folder / out), "--no-progress", "--local", *extra]
    )
    printed = capsys.readouterr().err
    assert code == 2
    assert says in printed
    assert list(folder.iterdir()) == []  # no database folder named o.npy, no lock


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--rate-503", "2"], "argument --rate-503: 2 is out of range: it must be at most 1"),
        (["--rate-stall", "-0.1"], "argument --rate-stall: -0.1 is out of range"),
        (["--rate-503", "0.6", "--rate-reset", "0.6"], "add up to 1.2: their sum must be at most"),
        (["--port", "99999"], "argument --port: 99999 is out of range: it must be at most 65535"),
        (["--window-s", "inf"], "argument --window-s: 'inf' is not a finite number"),
        (["--rpm", "0"], "argument --rpm: 0 is out of range: it must be over 0"),
    ],
)
def test_serve_with_a_value_out_of_range_exits_2_before_listening(
    capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    code = main(["serve", "--port", "0", *extra])
    printed = capsys.readouterr()
    assert code == 2
    assert says in printed.err
    assert "serving on" not in printed.out
    assert "Traceback" not in printed.err


def test_an_overlap_over_half_a_piece_exits_2_naming_the_most(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in" / "in.jsonl", docs(3))
    out = tmp_path / "out"
    out.mkdir()
    options = ["--model", "BAAI/bge-large-en-v1.5", "--overlap-tokens", "300"]
    code = main(["embed", str(source), "--out", str(out / "o.npy"), "--local", *options])
    printed = capsys.readouterr().err
    assert code == 2
    assert (
        "overlap_tokens = 300 is not allowed: model BAAI/bge-large-en-v1.5 takes at most 255"
        in printed
    )
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "given",
    [["--key", SECRET], [f"--token={SECRET}"], ["--api_key", f"Bearer {SECRET}"]],
    ids=["flag-value", "flag=value", "bearer"],
)
def test_a_key_given_to_an_unknown_flag_is_not_printed_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path, given: list[str]
) -> None:
    code, printed = _run(capsys, tmp_path, source, "--local", *given, "--nope", "5")
    assert code == 2
    assert "unrecognized arguments: --" in printed
    assert "(a value not shown)" in printed
    assert "--nope 5" in printed  # a value that cannot be a key is still shown
    assert SECRET not in printed
    assert SECRET[3:20] not in printed
