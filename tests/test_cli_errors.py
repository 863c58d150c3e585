"""CLI bad input beyond the registry commands: every case exits 2 with a one-line error."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from concilium.cli import app
from tests.conftest import HashEncoder
from tests.test_evaluation import synthetic

runner = CliRunner()


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small outcome table; the CLI's sentence encoder replaced by the hashing one."""
    import concilium.experts.embedder as embedder

    monkeypatch.setattr(embedder, "SentenceEncoder", lambda *a, **k: HashEncoder())
    return synthetic(5).write(tmp_path / "t.csv")


def _refused(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r.output


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("a: [1,\n", "config"),
        ("- 1\n- 2\n", "mapping"),
        ("applications: []\n", "applications"),
        ("concilium: [1]\n", "concilium"),
    ],
)
def test_calibrate_refuses_a_bad_config(table: Path, tmp_path: Path, text: str, word: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = _refused(["calibrate", "--target-share", "0.3", "--table", str(table), "-c", str(cfg)])
    assert word in out


def test_calibrate_out_in_a_missing_directory_is_exit_2(table: Path, tmp_path: Path) -> None:
    dest = tmp_path / "nodir" / "c.yaml"
    out = _refused(
        ["calibrate", "--target-share", "0.3", "--table", str(table), "--out", str(dest)]
    )
    assert "nodir" in out and not dest.exists()


def test_calibrate_out_is_written_whole(table: Path, tmp_path: Path) -> None:
    import yaml

    dest = tmp_path / "c.yaml"
    dest.write_text("old: 1\n")
    r = runner.invoke(
        app, ["calibrate", "--target-share", "0.3", "--table", str(table), "--out", str(dest)]
    )
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(dest.read_text())
    assert "default_quality_weight" in doc["routers"]["predictive"]
    assert {p.name for p in tmp_path.iterdir()} == {"c.yaml", "t.csv"}  # no temporary left


def test_eval_and_calibrate_refuse_a_table_too_small_to_split(table: Path, tmp_path: Path) -> None:
    one = synthetic(5).subset([0]).write(tmp_path / "one.csv")
    out = _refused(["eval", "--table", str(one), "--out", str(tmp_path / "o")])
    assert "one.csv" in out or "rows" in out
    out = _refused(["calibrate", "--target-share", "0.3", "--table", str(one)])
    assert "rows" in out


def test_eval_out_that_is_a_file_is_exit_2(table: Path, tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    out = _refused(["eval", "--table", str(table), "--out", str(f)])
    assert "afile" in out


def test_experts_add_refuses_a_binary_spec(tmp_path: Path) -> None:
    spec = tmp_path / "s.json"
    spec.write_bytes(b"\xff\xfe\x00garbage")
    out = _refused(["experts", "add", str(spec), "--home", str(tmp_path / "home")])
    assert "s.json" in out


def test_chat_refuses_a_malformed_url() -> None:
    out = _refused(["chat", "hi", "--url", "http://[::1"])
    assert "http://[::1" in out


@pytest.mark.parametrize(
    ("response", "words"),
    [
        (httpx.Response(404, text="<html>not found</html>"), ["HTTP 404", "not found"]),
        (
            httpx.Response(200, text="<html>a web page</html>"),
            ["http://127.0.0.1:9", "without a JSON object", "not a concilium gateway"],
        ),
        (
            httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]}),  # no routing
            ["http://127.0.0.1:9", "without choices and routing", "concilium gateway"],
        ),
    ],
)
def test_chat_against_something_that_is_not_a_gateway_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, response: httpx.Response, words: list[str]
) -> None:
    """Refused by the CLI's own error path (`error: ...`), not by a click usage error."""
    posted: list[str] = []

    def post(url: str, *a: object, **k: object) -> httpx.Response:
        posted.append(url)
        return response

    monkeypatch.setattr(httpx, "post", post)
    out = _refused(["chat", "hi", "--url", "http://127.0.0.1:9"])
    assert posted and all(u.startswith("http://127.0.0.1:9") for u in posted)
    assert out.startswith("error: ") and "Usage:" not in out, out
    for w in words:
        assert w in out, (w, out)


def test_experts_add_url_with_a_non_json_error_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = tmp_path / "s.json"
    spec.write_text('{"kind": "remote", "name": "x"}')
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(502, text="Bad Gateway"))
    out = _refused(["experts", "add", str(spec), "--url", "http://127.0.0.1:9"])
    assert "502" in out


@pytest.mark.parametrize("dest", ["/", "."])
def test_pack_build_refuses_an_output_without_a_name(dest: str) -> None:
    out = _refused(["pack", "build", "--out", dest, "--quick"])
    assert "--out" in out


EMPTY_PACK = '{"base": {"kind": "model", "name": "b", "path": "base"}, "experts": []}'


@pytest.mark.parametrize(
    ("manifest", "heldout", "word"),
    [
        ("{", "", "manifest"),
        ('{"version": 1}', "", "experts"),
        (EMPTY_PACK, None, "heldout"),
        (EMPTY_PACK, "{", "heldout"),
    ],
)
def test_eval_refuses_a_damaged_pack(
    table: Path, tmp_path: Path, manifest: str, heldout: str | None, word: str
) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "manifest.json").write_text(manifest)
    if heldout is not None:
        (pack / "heldout.jsonl").write_text(heldout)
    out = _refused(["eval", "--pack", str(pack), "--out", str(tmp_path / "o")])
    assert word in out


def test_eval_fit_table_needs_a_table(table: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import concilium.evaluation

    monkeypatch.setattr(concilium.evaluation, "run_eval", lambda *a, **k: ("", []))
    out = _refused(["eval", "--fit-table", str(table)])  # would silently evaluate the demo pack
    assert "--table" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--max-cost", "-1"],
        ["--max-latency-ms", "-5"],
        ["--max-cost", "nan"],
        ["--max-tokens", "0"],
    ],
)
def test_route_refuses_negative_ceilings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]
) -> None:
    import concilium.orchestrator.service as service

    monkeypatch.setattr(service, "build_service", lambda *a, **k: None)  # no model needed
    out = _refused(["route", "hello", "--home", str(tmp_path), *args])
    assert args[0] in out or args[0].removeprefix("--").replace("-", "_") in out


def test_experts_rm_url_deletes_through_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, dict[str, str]]] = []

    def delete(url: str, headers: dict[str, str], **_: object) -> httpx.Response:
        sent.append((url, headers))
        return httpx.Response(200, json={"deleted": "a b", "version": 7})

    monkeypatch.setenv("CONCILIUM_ADMIN_KEY", "k")
    monkeypatch.setattr(httpx, "delete", delete)
    r = runner.invoke(app, ["experts", "rm", "a b", "--url", "http://127.0.0.1:9/"])
    assert r.exit_code == 0, r.output
    assert "registry version 7" in r.output
    assert sent == [("http://127.0.0.1:9/v1/experts/a%20b", {"Authorization": "Bearer k"})]
    monkeypatch.setattr(httpx, "delete", lambda *a, **k: httpx.Response(404, json={}))
    assert "404" in _refused(["experts", "rm", "x", "--url", "http://127.0.0.1:9"])
