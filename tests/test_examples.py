"""Every example runs (smoke test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_route_and_answer_example(pack_dir: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "route_and_answer.py"),
            "Reverse this word: stone",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    *_, answer, routing = out.stdout.strip().splitlines()
    assert answer == "enots"  # the reverse adapter's answer, not the base's
    fields = dict(f.split("=", 1) for f in routing.split())
    assert fields.keys() == {"expert", "router", "confidence", "cost"}
    assert fields["expert"] == "reverse" and fields["router"] == "retriever"
    assert 0 < float(fields["confidence"]) <= 1 and float(fields["cost"]) > 0
