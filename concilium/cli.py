"""The `concilium` command. Bad input exits with code 2 and a one-line error, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from concilium.config import ServiceConfig, load_config
from concilium.errors import ConciliumError, InvalidInput

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="concilium: routed modular experts behind one OpenAI-compatible gateway.",
)
experts_app = typer.Typer(no_args_is_help=True, help="Register, list, inspect and remove experts.")
pack_app = typer.Typer(no_args_is_help=True, help="The demo expert pack.")
app.add_typer(experts_app, name="experts")
app.add_typer(pack_app, name="pack")
out = Console()
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Service config YAML.")
HomeOpt = typer.Option(None, "--home", help="Data dir (default $CONCILIUM_HOME or ./.concilium).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def _fail(msg: str) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _config(config: Path | None, **overrides: Any) -> ServiceConfig:
    try:
        return load_config(config, **overrides)
    except ConciliumError as e:
        _fail(str(e))


@app.command()
def serve(
    config: Path | None = ConfigOpt,
    host: str | None = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default 8000)."),
    home: Path | None = HomeOpt,
    pack: Path | None = typer.Option(None, help="Demo pack to seed an empty registry from."),
    embed_pack: Path | None = typer.Option(
        None, help="Embedding pack (domain embedding experts) to register on first start."
    ),
    no_ray: bool = typer.Option(False, "--no-ray", help="Serve in-process with uvicorn, no Ray."),
) -> None:
    """Start the gateway (local Ray Serve by default) and print how to call it."""
    cfg = _config(config, host=host, port=port, home=home, pack=pack, embed_pack=embed_pack)
    try:
        if no_ray:
            from concilium.orchestrator.local_server import run_local

            run_local(cfg, announce=_announce)
        else:
            from concilium.deployments.builder import run_serve

            run_serve(cfg, announce=_announce)
    except ConciliumError as e:
        _fail(str(e))


def _announce(cfg: ServiceConfig) -> None:
    url = f"http://{cfg.host}:{cfg.port}"
    out.print(f"\n[bold green]concilium gateway listening on {url}[/bold green]  (Ctrl-C stops)\n")
    out.print(
        f"""  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "auto", "messages": [{{"role": "user", \\
          "content": "Reverse this word: planet"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-'); \\
r = c.chat.completions.create(model='auto', messages=[{{'role': 'user', \\
'content': 'Reverse this word: planet'}}]); print(r.choices[0].message.content)"
""",
        highlight=False,
        soft_wrap=True,
    )


# -- experts -----------------------------------------------------------------------------------
def _registry(config: Path | None, home: Path | None) -> Any:
    from concilium.orchestrator.service import open_registry

    cfg = _config(config, home=home)
    try:
        return open_registry(cfg)
    except (ConciliumError, OSError) as e:  # a damaged store, a --home that is a file
        _fail(str(e))


def _store(config: Path | None, home: Path | None) -> Any:
    """The SQLite store alone: listing and removal need no encoder."""
    from concilium.registry.store import store_at

    cfg = _config(config, home=home)
    try:
        return store_at(cfg.home)
    except (ConciliumError, OSError) as e:  # a damaged store, a --home that is a file
        _fail(str(e))


@experts_app.command("add")
def experts_add(
    spec: Path | None = typer.Argument(None, help="Expert spec JSON/YAML file."),
    from_pack: str | None = typer.Option(None, "--from-pack", help="A demo pack expert by name."),
    pack: Path = typer.Option(Path("demo_pack"), help="Demo pack dir for --from-pack."),
    url: str | None = typer.Option(None, help="Register through a running gateway instead."),
    config: Path | None = ConfigOpt,
    home: Path | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Register an expert (validated, artifacts built, live for running gateways)."""
    data, base_dir = _spec_input(spec, from_pack, pack)
    if url is not None:
        body = _post_expert(url, data, _config(config).admin_key())
    else:
        from concilium.orchestrator.http import record_json

        try:
            registry = _registry(config, home)
            body = record_json(registry.register(data, base_dir=base_dir))
        except ConciliumError as e:
            _fail(str(e))
        if not registry.wait_for_gates(timeout=120):  # the PHATGOOSE gate trains in background
            err.print("warning: the PHATGOOSE gate is still training; it resumes next start")
    if as_json:
        out.print_json(data=body)
    else:
        out.print(
            f"registered [bold]{body['name']}[/bold] ({body['kind']}) at registry version "
            f"{body['version']}"
        )


def _spec_input(
    spec: Path | None, from_pack: str | None, pack: Path
) -> tuple[dict[str, Any], Path | None]:
    if (spec is None) == (from_pack is None):
        _fail("give exactly one of SPEC (a file) or --from-pack NAME")
    if from_pack is not None:
        from concilium.orchestrator.service import pack_expert

        try:
            return pack_expert(pack, from_pack), None
        except ConciliumError as e:
            _fail(str(e))
    assert spec is not None
    import yaml

    try:
        data = yaml.safe_load(spec.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        _fail(f"cannot read spec {spec}: {e}")
    if not isinstance(data, dict):
        _fail(f"spec {spec} must be a JSON/YAML mapping")
    return data, spec.parent


def _post_expert(url: str, data: dict[str, Any], key: str | None) -> dict[str, Any]:
    import httpx

    headers = _admin_headers(key)
    try:
        r = httpx.post(url.rstrip("/") + "/v1/experts", json=data, headers=headers, timeout=120)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        _fail(f"cannot reach {url}: {e}")
    body = _answer_json(r, url)
    if not all(k in body for k in ("name", "kind", "version")):
        _fail(f"{url} answered the POST without the registered expert: not a concilium gateway")
    return body


def _admin_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _answer_json(r: Any, url: str) -> dict[str, Any]:
    """The JSON object of a gateway answer; an HTTP error or a non-JSON body fails cleanly."""
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code >= 400:
        err_obj = data.get("error") if isinstance(data, dict) else None
        msg = err_obj.get("message") if isinstance(err_obj, dict) else None
        _fail(f"HTTP {r.status_code}: {msg or r.text[:200]}")
    if not isinstance(data, dict):
        _fail(f"{url} answered HTTP {r.status_code} without a JSON object: not a concilium gateway")
    return data


@experts_app.command("list")
def experts_list(
    config: Path | None = ConfigOpt, home: Path | None = HomeOpt, as_json: bool = JsonOpt
) -> None:
    """List registered experts."""
    store = _store(config, home)
    recs = store.list()
    if as_json:
        out.print_json(
            data=[
                {"name": r.name, "kind": r.spec.kind, "task": r.spec.task, "version": r.version}
                for r in recs
            ]
        )
        return
    t = Table("name", "kind", "task", "base", "categories", "pilots", "version")
    for r in recs:
        t.add_row(
            r.name,
            r.spec.kind,
            r.spec.task,
            getattr(r.spec, "base", "") or "",
            ",".join(r.spec.categories),
            str(len(r.spec.examples)),
            str(r.version),
        )
    out.print(t)
    out.print(f"registry version {store.version()}")


@experts_app.command("show")
def experts_show(name: str, config: Path | None = ConfigOpt, home: Path | None = HomeOpt) -> None:
    """Show one expert's spec and artifacts (JSON)."""
    from concilium.orchestrator.http import record_json

    try:
        rec = _store(config, home).get(name)
    except ConciliumError as e:
        _fail(str(e))
    out.print_json(data=record_json(rec))


@experts_app.command("rm")
def experts_rm(
    name: str,
    url: str | None = typer.Option(
        None, help="Remove through a running gateway (drains the expert's requests first)."
    ),
    config: Path | None = ConfigOpt,
    home: Path | None = HomeOpt,
) -> None:
    """Remove an expert (running gateways stop routing to it within a second).

    Without --url the row is removed from the store directly: a model expert registered while
    the server ran keeps its own Serve application until the server restarts; with --url the
    gateway drains its in-flight requests and deletes that application too."""
    if url is not None:
        version = _delete_expert(url, name, _config(config).admin_key())
    else:
        try:
            version = _store(config, home).remove(name)
        except ConciliumError as e:
            _fail(str(e))
    out.print(f"removed {name}; registry version {version}")


def _delete_expert(url: str, name: str, key: str | None) -> int:
    from urllib.parse import quote

    import httpx

    headers = _admin_headers(key)
    target = url.rstrip("/") + "/v1/experts/" + quote(name, safe="")
    try:
        r = httpx.delete(target, headers=headers, timeout=300)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        _fail(f"cannot reach {url}: {e}")
    version = _answer_json(r, url).get("version")
    if not isinstance(version, int):
        _fail(f"{url} answered the DELETE without a registry version: not a concilium gateway")
    return version


@experts_app.command("gc")
def experts_gc(
    grace_s: float = typer.Option(
        600.0, "--grace-s", min=0, help="Keep artifacts written or reused this recently."
    ),
    config: Path | None = ConfigOpt,
    home: Path | None = HomeOpt,
) -> None:
    """Delete stored artifacts no registered expert uses (what removals left behind)."""
    from concilium.registry.artifacts import artifacts_at
    from concilium.registry.registry import referenced

    store = _store(config, home)
    artifacts = artifacts_at(_config(config, home=home).home)
    try:
        removed = artifacts.gc(referenced(store.list()), grace_s=grace_s)
    except (ConciliumError, OSError) as e:
        _fail(str(e))
    out.print(f"removed {len(removed)} unreferenced artifact(s)")


# -- route / chat ------------------------------------------------------------------------------
@app.command()
def route(
    query: str,
    router: str | None = typer.Option(None, help="Router name (default: the configured one)."),
    max_cost: float | None = typer.Option(None, min=0, help="Cost ceiling."),
    max_latency_ms: float | None = typer.Option(None, min=0, help="Latency ceiling (ms)."),
    max_tokens: int | None = typer.Option(
        None, min=1, help="Tokens the answer may use (for estimates)."
    ),
    config: Path | None = ConfigOpt,
    home: Path | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show the routing decision for a query (in-process, no expert is called)."""
    from pydantic import ValidationError

    from concilium.orchestrator.objective import Objective
    from concilium.orchestrator.schemas import RoutingOptions
    from concilium.orchestrator.service import build_service

    try:  # checked before any model loads
        opts = RoutingOptions(max_cost=max_cost, max_latency_ms=max_latency_ms)
    except ValidationError as e:
        _fail(
            "; ".join(
                f"--{'-'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}"
                for x in e.errors()
            )
        )
    cfg = _config(config, home=home)
    try:
        svc = build_service(cfg, seed=False)
        routed = svc.orchestrator.route(
            query,
            model=f"router-{router}" if router else "auto",
            objective=Objective.from_options(opts),
            max_tokens=max_tokens,
        )
    except ConciliumError as e:
        _fail(str(e))
    d = routed.decision
    data: dict[str, Any] = {
        "decision_id": d.decision_id,
        "router": d.router,
        "expert": d.expert,
        "experts": list(d.experts),
        "confidence": d.confidence,
        "reason": d.reason,
        "scores": dict(sorted(d.scores.items(), key=lambda kv: -kv[1])),
        "estimated_cost": routed.candidates[d.expert].est_cost,
        "estimated_latency_ms": routed.candidates[d.expert].est_latency_ms,
    }
    if as_json:
        out.print_json(data=data)
        return
    out.print(f"[bold]{d.expert}[/bold] via {d.router} (confidence {d.confidence:.3f}): {d.reason}")
    for name, score in list(data["scores"].items())[:5]:
        out.print(f"  {score:+.4f}  {name}")


@app.command()
def chat(
    query: str,
    url: str = typer.Option("http://127.0.0.1:8000", help="Gateway URL."),
    model: str = typer.Option("auto", help="auto | router-<name> | <expert> | <base>:<adapter>"),
    max_tokens: int | None = typer.Option(None, help="Answer length cap."),
    as_json: bool = JsonOpt,
) -> None:
    """Send one chat message to a running gateway and print the answer and its routing."""
    import httpx

    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": query}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    try:
        r = httpx.post(url.rstrip("/") + "/v1/chat/completions", json=body, timeout=120)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        _fail(f"cannot reach {url}: {e}")
    data = _answer_json(r, url)
    if as_json:
        out.print_json(data=data)
        return
    try:
        rt = data["routing"]
        text = data["choices"][0]["message"]["content"]
        line = (
            f"[dim]{rt['expert']} via {rt['router']} · confidence {rt['confidence']:.3f} · "
            f"cost {rt['cost']:.6f} · {rt['latency_ms']:.0f} ms[/dim]"
        )
    except (KeyError, IndexError, TypeError, ValueError):
        _fail(f"{url} answered without choices and routing: is it a concilium gateway?")
    out.print(text, highlight=False, markup=False)  # the answer verbatim: '[x]' is no style
    out.print(line)


# -- evaluation and calibration ------------------------------------------------------------------
@app.command("eval")
def eval_cmd(
    pack: Path = typer.Option(Path("demo_pack"), help="Demo pack whose experts are evaluated."),
    table: Path | None = typer.Option(
        None, help="Evaluate an imported outcome table (RouterBench layout, CSV/Parquet) instead."
    ),
    fit_table: Path | None = typer.Option(
        None, help="Outcomes the predictive router learns from (default: half of --table)."
    ),
    out_dir: Path = typer.Option(Path("benchmarks/results"), "--out", help="Results directory."),
    quick: bool = typer.Option(False, help="4 queries per skill: under a minute."),
    seed: int = typer.Option(0, help="Seed of samples, splits and the random baseline."),
) -> None:
    """Routers and strategies vs baselines: quality, cost, % of oracle, AIQ, APGR, Pareto plot."""
    import time

    from concilium.evaluation import run_eval

    t0 = time.perf_counter()
    if fit_table is not None and table is None:
        _fail("--fit-table goes with --table (the demo pack brings its own fit table)")
    if table is None and not (pack / "manifest.json").is_file():
        _fail(f"{pack} is not a demo pack (no manifest.json); build it with `make pack`")
    try:
        md, targets = run_eval(
            out_dir,
            pack_dir=None if table is not None else pack,
            table=table,
            fit_table=fit_table,
            quick=quick,
            seed=seed,
            say=lambda m: err.print(
                f"[{time.perf_counter() - t0:5.1f}s] {m}", highlight=False, markup=False
            ),
        )
    except ConciliumError as e:
        _fail(str(e))
    except OSError as e:
        _fail(str(e))
    out.print(md, highlight=False, markup=False)
    suffix = "_quick" if quick else ""
    out.print(
        f"wrote {out_dir}/eval{suffix}.md and eval{suffix}.png", highlight=False, markup=False
    )
    for line in targets:
        out.print(line, highlight=False, markup=False)


@app.command()
def calibrate(
    target_share: float = typer.Option(
        ..., min=0.0, max=1.0, help="Share of traffic that may go to expensive experts."
    ),
    pack: Path = typer.Option(Path("demo_pack"), help="Demo pack (its outcome table is used)."),
    table: Path | None = typer.Option(None, help="An outcome table (RouterBench layout) instead."),
    expensive: str | None = typer.Option(
        None, help="Comma-separated expensive experts (default: above the median cost)."
    ),
    seed: int = typer.Option(0, help="Seed of the known/calibration split."),
    config: Path | None = ConfigOpt,
    out_path: Path | None = typer.Option(
        None, "--out", help="Write the calibrated config here (default: print it)."
    ),
) -> None:
    """Fit the predictive router's quality weight and the cascade threshold (RouteLLM-style)."""
    import yaml

    from concilium.evaluation.build import cached_tables
    from concilium.evaluation.calibrate import calibrate as fit
    from concilium.evaluation.calibrate import merge_into
    from concilium.evaluation.harness import demo_replay, imported_replay
    from concilium.experts.embedder import SentenceEncoder
    from concilium.outcomes.table import OutcomeTable

    try:
        encoder = SentenceEncoder()
        if table is not None:
            data = OutcomeTable.read(table)
            replay_for: Any = lambda known, calib: imported_replay(encoder, known, calib)  # noqa: E731
        else:
            if not (pack / "manifest.json").is_file():
                _fail(f"{pack} is not a demo pack (no manifest.json)")
            data, _ = cached_tables(pack, Path("benchmarks/results/outcomes"), per_skill=None)
            replay_for = lambda known, calib: demo_replay(pack, encoder, known, calib)  # noqa: E731
        names = [n.strip() for n in expensive.split(",")] if expensive else None
        unknown = sorted(set(names or []) - set(data.experts))
        if unknown:
            _fail(f"--expensive names experts not in the table: {unknown}")
        merge_into(config, {})  # a bad config fails before the fit, not after it
        cal = fit(replay_for, data, target_share=target_share, seed=seed, expensive=names)
        doc = merge_into(config, cal.config())
    except (ConciliumError, OSError) as e:  # OSError: an unreadable table, an unwritable cache
        _fail(str(e))
    out.print(
        f"expensive experts: {', '.join(cal.expensive)}\n"
        f"predictive default_quality_weight = {cal.quality_weight:.2f} "
        f"({100 * cal.share_at_weight:.1f}% of {cal.queries} calibration queries to expensive)\n"
        f"cascade_threshold = {cal.cascade_threshold:.4f} "
        f"({100 * cal.escalation_share:.1f}% escalate past the first stage); seed {seed}",
        highlight=False,
    )
    text = yaml.safe_dump(doc, sort_keys=False)
    if out_path is None:
        out.print(text, highlight=False, markup=False)
    else:
        _write_whole(out_path, text)
        out.print(f"wrote {out_path}", markup=False)


def _write_whole(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _fail(f"cannot write {path}: {e}")


# -- pack ----------------------------------------------------------------------------------------
@pack_app.command("build")
def pack_build(
    out_dir: Path = typer.Option(Path("demo_pack"), "--out", help="Output directory."),
    seed: int = typer.Option(0, help="Seed (the build is deterministic given it)."),
    quick: bool = typer.Option(False, help="Tiny, fast build (tests)."),
) -> None:
    """Build the demo expert pack (MoE base + LoRA skill adapters) from a seed."""
    from concilium.pack.build import build_pack

    try:
        path = build_pack(
            out_dir, seed=seed, quick=quick, progress=lambda m: err.print(m, markup=False)
        )
    except ConciliumError as e:
        _fail(str(e))
    out.print(f"demo pack written to {path}", markup=False)


def main() -> None:
    try:
        app()
    except InvalidInput as e:  # pragma: no cover - commands catch their own
        err.print(f"error: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
