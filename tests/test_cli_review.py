"""CLI defects found in review: each bad input exits 2 with a one-line error, and text that is
not ours (answers, paths) is printed as it is, never read as rich markup."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from concilium.cli import app
from tests.conftest import HashEncoder, remote_spec
from tests.test_evaluation import synthetic

runner = CliRunner()


@pytest.fixture(autouse=True)
def hash_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    import concilium.experts.embedder as embedder

    monkeypatch.setattr(embedder, "SentenceEncoder", lambda *a, **k: HashEncoder())


def _refused(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Usage:" not in r.output
    return r.output


def _spec(tmp_path: Path) -> Path:
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(remote_spec("alpha", ["one"])))
    return spec


@pytest.mark.parametrize("command", [["experts", "list"], ["experts", "gc"], ["experts", "add"]])
@pytest.mark.parametrize("damage", ["not-a-database", "home-is-a-file"])
def test_experts_commands_on_a_damaged_home_are_exit_2(
    tmp_path: Path, command: list[str], damage: str
) -> None:
    home = tmp_path / "home"
    if damage == "home-is-a-file":
        home.write_text("x")
    else:
        home.mkdir()
        (home / "registry.sqlite").write_bytes(b"garbage" * 100)
    extra = [str(_spec(tmp_path))] if command[1] == "add" else []
    out = _refused([*command, *extra, "--home", str(home)])
    assert str(home) in out


def test_experts_add_url_answered_without_the_expert_is_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json={"ok": True}))
    out = _refused(["experts", "add", str(_spec(tmp_path)), "--url", "http://127.0.0.1:9"])
    assert "http://127.0.0.1:9" in out and "not a concilium gateway" in out


ROUTING = {"expert": "e", "router": "r", "confidence": 0.5, "cost": 0.001, "latency_ms": 12.0}


def _answer(content: str, routing: object) -> httpx.Response:
    body = {"choices": [{"message": {"content": content}}], "routing": routing}
    return httpx.Response(200, json=body)


def test_chat_prints_the_answer_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "items: [a] and [b]; x[/y]"
    monkeypatch.setattr(httpx, "post", lambda *a, **k: _answer(text, ROUTING))
    r = runner.invoke(app, ["chat", "hi", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.output.splitlines()[0] == text


@pytest.mark.parametrize("routing", [{"expert": "e"}, {**ROUTING, "confidence": None}, []])
def test_chat_routing_without_its_fields_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, routing: object
) -> None:
    monkeypatch.setattr(httpx, "post", lambda *a, **k: _answer("hi", routing))
    out = _refused(["chat", "hi", "--url", "http://127.0.0.1:9"])
    assert "without choices and routing" in out


def test_an_error_naming_a_path_with_brackets_is_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "[/x]" / "spec.json"
    out = _refused(["experts", "add", str(spec)])
    assert "[/x]" in out and "cannot read spec" in out


def test_eval_reports_an_out_dir_with_brackets(tmp_path: Path) -> None:
    table = synthetic(5).write(tmp_path / "t.csv")
    dest = tmp_path / "runs[/v2]"
    r = runner.invoke(app, ["eval", "--table", str(table), "--out", str(dest)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"wrote {dest}/eval.md" in r.output.replace("\n", "")
    assert (dest / "eval.md").is_file()


def test_calibrate_with_an_unreadable_table_is_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concilium.outcomes.table import OutcomeTable

    table = synthetic(5).write(tmp_path / "t.csv")

    def denied(path: Path) -> OutcomeTable:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(OutcomeTable, "read", staticmethod(denied))
    out = _refused(["calibrate", "--target-share", "0.3", "--table", str(table)])
    assert "Permission denied" in out and "t.csv" in out


def test_calibrate_with_a_mistyped_config_is_exit_2_and_keeps_the_real_one(
    tmp_path: Path,
) -> None:
    table = synthetic(5).write(tmp_path / "t.csv")
    real = tmp_path / "config.yaml"
    real.write_text("home: .concilium\n")
    args = ["calibrate", "--target-share", "0.3", "--table", str(table)]
    out = _refused([*args, "-c", str(tmp_path / "confg.yaml"), "--out", str(real)])
    assert "confg.yaml" in out
    assert real.read_text() == "home: .concilium\n"
