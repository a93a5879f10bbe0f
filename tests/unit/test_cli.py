"""The command line answers bad input with one clear line and exit code 1, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tillsync.cli import app

pytestmark = pytest.mark.unit

runner = CliRunner()


@pytest.fixture
def till_dir(tmp_path: Path) -> Path:
    result = runner.invoke(app, ["till", "init", "--serial", "K1", "--name", "Kasse 1", "--data-dir", str(tmp_path / "k1")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["till", "add-article", "--nr", "1", "--text", "Brezel", "--price-cents", "95", "--vat-key", "2",
         "--data-dir", str(tmp_path / "k1")],
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "k1"


def _fails_cleanly(args: list[str], *expected: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output
    return result.output


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("1:inf", "finite number"),
        ("1:NaN", "finite number"),
        ("1:abc", "quantity must be a number"),
        ("1:0", "quantity must not be 0"),
        ("1:0.0001", "decimal places"),
        ("1:99999999999", "quantity"),
        ("2:1", "known article number"),
        ("1:1:99999999999999999999", "price must be within"),
    ],
)
def test_selling_bad_lines_fails_with_a_clear_error(till_dir: Path, item: str, expected: str) -> None:
    _fails_cleanly(["till", "sell", item, "--data-dir", str(till_dir)], "error:", expected)


def test_a_sale_that_works_prints_its_receipt(till_dir: Path) -> None:
    result = runner.invoke(app, ["till", "sell", "1:3", "--data-dir", str(till_dir)])
    assert result.exit_code == 0, result.output
    assert "receipt 1: 2.85 EUR" in result.output


def test_init_on_a_file_fails_cleanly(tmp_path: Path) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    _fails_cleanly(["till", "init", "--serial", "K", "--name", "N", "--data-dir", str(a_file)], "is a file")


def test_commands_on_a_missing_till_say_how_to_create_one(tmp_path: Path) -> None:
    _fails_cleanly(["till", "status", "--data-dir", str(tmp_path / "none")], "tillsync till init")


def test_upload_of_a_signed_out_till_stops_at_once(till_dir: Path) -> None:
    runner.invoke(app, ["till", "sell", "1:1", "--data-dir", str(till_dir)])
    output = _fails_cleanly(["till", "upload", "--data-dir", str(till_dir)], "signed out")
    assert "records wait for the next sign-in" in output


def test_a_z_report_for_a_future_day_is_refused(till_dir: Path) -> None:
    _fails_cleanly(["till", "close-day", "--day", "2999-01-01", "--data-dir", str(till_dir)], "in the future")


def test_demo_with_a_missing_input_fails_cleanly(tmp_path: Path) -> None:
    _fails_cleanly(["demo", "--input", str(tmp_path / "missing.csv")], "no such file")


def test_article_with_an_empty_text_fails_cleanly(till_dir: Path) -> None:
    _fails_cleanly(
        ["till", "add-article", "--nr", "9", "--text", "", "--price-cents", "1", "--data-dir", str(till_dir)], "text"
    )


def test_a_deleted_article_comes_back_only_with_restore(till_dir: Path) -> None:
    assert runner.invoke(app, ["till", "delete", "article", "1", "--data-dir", str(till_dir)]).exit_code == 0
    _fails_cleanly(["till", "add-article", "--nr", "1", "--price-cents", "99", "--data-dir", str(till_dir)], "--restore")
    restored = runner.invoke(
        app, ["till", "add-article", "--nr", "1", "--text", "Brezel", "--price-cents", "99", "--restore", "--data-dir", str(till_dir)]
    )
    assert restored.exit_code == 0 and "article 1 restored" in restored.output


def test_saving_an_article_unchanged_says_so(till_dir: Path) -> None:
    result = runner.invoke(app, ["till", "add-article", "--nr", "1", "--price-cents", "95", "--data-dir", str(till_dir)])
    assert result.exit_code == 0 and "article 1 unchanged" in result.output


@pytest.mark.parametrize(
    ("custom", "expected"),
    [('{"download_articles": "yes"}', "valid boolean"), ('{"nope": true}', "unknown switch"), ("[1]", "JSON object"),
     ("{", "not valid JSON")],
)
def test_bad_custom_switches_are_refused_before_any_request(till_dir: Path, custom: str, expected: str) -> None:
    _fails_cleanly(["till", "mode", "custom", "--custom", custom, "--data-dir", str(till_dir)], expected)
