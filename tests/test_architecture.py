"""Layering: only concilium/deployments imports ray; `import concilium` stays cheap."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys

import concilium

PKG = __import__("pathlib").Path(concilium.__file__).parent


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PKG)], prefix="concilium."))


def test_nothing_outside_deployments_imports_ray_statically() -> None:
    offenders = []
    for path in PKG.rglob("*.py"):
        if "deployments" in path.relative_to(PKG).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


def test_importing_every_non_deployment_module_leaves_ray_unloaded() -> None:
    mods = [m for m in _modules() if not m.startswith("concilium.deployments")]
    assert "concilium.orchestrator.pipeline" in mods and "concilium.experts.local" in mods
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_import_concilium_is_cheap() -> None:
    code = (
        "import concilium, sys, json; print(json.dumps([m for m in ('torch', 'transformers', "
        "'ray', 'faiss', 'sentence_transformers') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip()) == []


def test_public_surface_is_sorted_and_pinned() -> None:
    assert concilium.__all__ == sorted(concilium.__all__)
    assert set(concilium.__all__) == {
        "AdapterRejected",
        "Candidate",
        "ConciliumError",
        "ConfigError",
        "Conflict",
        "ExpertFailed",
        "ExpertNotFound",
        "InvalidInput",
        "LoraSpec",
        "ModelSpec",
        "ObjectiveUnsatisfiable",
        "Query",
        "QueryRouter",
        "RemoteSpec",
        "RouteDecision",
        "ServiceConfig",
        "UnsafeURL",
        "__version__",
        "load_config",
        "parse_spec",
    }
    for name in concilium.__all__:
        assert hasattr(concilium, name)
