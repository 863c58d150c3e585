"""Route and answer one query in-process (no Ray, no HTTP): the core as a library.

python examples/route_and_answer.py "Reverse this word: planet"
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from concilium.config import load_config
from concilium.orchestrator.schemas import ChatCompletionRequest
from concilium.orchestrator.service import build_service

PACK = Path(__file__).resolve().parents[1] / "demo_pack"


async def main(query: str) -> None:
    with tempfile.TemporaryDirectory() as home:
        svc = build_service(load_config(None, home=Path(home), pack=PACK, seed_embedder=False))
        req = ChatCompletionRequest.model_validate(
            {
                "model": "auto",
                "messages": [{"role": "user", "content": query}],
                "routing": {"max_cost": 1.0},
            }
        )
        out = await svc.orchestrator.chat(req)
        await svc.backend.aclose()
    routing = out.body["routing"]
    print(out.body["choices"][0]["message"]["content"])
    print(
        f"expert={routing['expert']} router={routing['router']} "
        f"confidence={routing['confidence']:.3f} cost={routing['cost']:.6f}"
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "Reverse this word: planet"))
