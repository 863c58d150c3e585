"""CLI: clear errors with exit code 2, JSON output, offline registry commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from concilium.cli import app
from concilium.registry.registry import Registry
from tests.conftest import HashEncoder, remote_spec

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    reg = Registry(tmp_path, HashEncoder())
    reg.register(remote_spec("alpha", ["one"], categories=["c1"]))
    reg.register(remote_spec("beta", ["two"]))
    return tmp_path


def test_list_and_show(home: Path) -> None:
    r = runner.invoke(app, ["experts", "list", "--home", str(home), "--json"])
    assert r.exit_code == 0, r.output
    assert [e["name"] for e in json.loads(r.output)] == ["alpha", "beta"]
    r = runner.invoke(app, ["experts", "show", "alpha", "--home", str(home)])
    assert r.exit_code == 0 and json.loads(r.output)["spec"]["categories"] == ["c1"]


def test_rm_then_missing_is_exit_2(home: Path) -> None:
    assert runner.invoke(app, ["experts", "rm", "beta", "--home", str(home)]).exit_code == 0
    r = runner.invoke(app, ["experts", "rm", "beta", "--home", str(home)])
    assert r.exit_code == 2 and "beta" in r.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["experts", "add", "/nonexistent/spec.json"],
            ["cannot read spec", "/nonexistent/spec.json"],
        ),
        (["experts", "add"], ["exactly one of SPEC", "--from-pack"]),
        (["experts", "show", "ghost"], ["no expert named 'ghost'"]),
        (
            ["experts", "add", "--from-pack", "ghost", "--pack", "/nonexistent"],
            ["/nonexistent/manifest.json"],
        ),
        (["serve", "--port", "0"], ["invalid config field port"]),
        (["chat", "hi", "--url", "http://127.0.0.1:9"], ["cannot reach http://127.0.0.1:9"]),
    ],
)
def test_bad_input_exits_2_without_traceback(home: Path, args: list[str], words: list[str]) -> None:
    """Each is refused by the CLI's own error path (`error: ...`), not by click's usage-error
    handling (also exit 2), which is what a renamed or misspelt option would get."""
    if args[0] in ("experts",) and args[1] in ("add", "show"):
        args = [*args, "--home", str(home)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert r.output.startswith("error: "), r.output
    assert "Usage:" not in r.output
    for w in words:
        assert w in r.output, (w, r.output)


def test_an_unknown_command_is_a_usage_error_exit_2() -> None:
    r = runner.invoke(app, ["nonsense-command"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert "Usage:" in r.output and "No such command 'nonsense-command'" in r.output


def test_bad_config_file_is_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("default_router: nope\n")
    r = runner.invoke(app, ["experts", "list", "--config", str(cfg)])
    assert r.exit_code == 2 and "default_router" in r.output
    cfg.write_text("port: [1, 2]\n")
    r = runner.invoke(app, ["experts", "list", "--config", str(cfg)])
    assert r.exit_code == 2 and "port" in r.output


def test_add_spec_file_with_relative_path_is_rejected_cleanly(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"kind": "lora", "name": "ad", "base": "alpha", "path": "nowhere"}))
    r = runner.invoke(app, ["experts", "add", str(spec), "--home", str(home)])
    assert r.exit_code == 2 and "alpha" in r.output  # alpha is a remote expert, not a model


def test_non_loopback_bind_needs_an_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from concilium.config import load_config
    from concilium.errors import ConfigError

    monkeypatch.delenv("CONCILIUM_ADMIN_KEY", raising=False)
    with pytest.raises(ConfigError, match="admin_api_key"):
        load_config(None, host="0.0.0.0")
    assert load_config(None, host="0.0.0.0", admin_api_key="k").host == "0.0.0.0"


def test_gc_deletes_what_a_removal_left_and_keeps_what_is_registered(home: Path) -> None:
    reg = Registry(home, HashEncoder())
    kept, gone = (reg.get(n).artifacts["embeddings"] for n in ("alpha", "beta"))
    assert runner.invoke(app, ["experts", "rm", "beta", "--home", str(home)]).exit_code == 0
    r = runner.invoke(app, ["experts", "gc", "--home", str(home)])  # default grace: all too new
    assert r.exit_code == 0 and "removed 0" in r.output
    assert (home / "artifacts" / gone).exists()
    r = runner.invoke(app, ["experts", "gc", "--grace-s", "0", "--home", str(home)])
    assert r.exit_code == 0 and "removed 1" in r.output, r.output
    assert not (home / "artifacts" / gone).exists() and (home / "artifacts" / kept).exists()
    assert reg.get("alpha").artifacts["embeddings"] == kept
    r = runner.invoke(app, ["experts", "gc", "--grace-s", "-1", "--home", str(home)])
    assert r.exit_code == 2 and "Traceback" not in r.output
