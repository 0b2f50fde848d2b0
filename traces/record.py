"""Record the shipped traces again, for real, on the default registry (SmolLM2, greedy).

    .venv/bin/python traces/record.py

Rewrites success, cache-hit, fallback and invalid .jsonl beside this file; the replay tests
(tests/replay/) run on them. Re-record after a trace format change.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from orion_fsm import CacheSet, Engine, RequestFailed
from orion_fsm.testing.faults import faulty_loader

HERE = Path(__file__).resolve().parent
# The first generation of this plan raises an injected InferenceError, the second does not.
FAULT_SEED = 4


def fresh(name: str) -> Path:
    path = HERE / f"{name}.jsonl"
    path.unlink(missing_ok=True)
    return path


async def main() -> None:
    # Memory-only result caches: an answer cached by an earlier run must not be replayed here.
    async with Engine(trace_path=fresh("success"), caches=CacheSet(None)) as engine:
        # Embedding routing: the trace keeps every agent's score.
        await engine.infer("Write a Python function that checks whether a number is prime.",
                           temperature=0, max_tokens=48)

    async with Engine(trace_path=fresh("cache-hit"), caches=CacheSet(None),
                      embeddings=False) as engine:
        for _ in range(2):  # the second is served from L1
            await engine.infer("Hello! How are you today?", temperature=0, max_tokens=24)

    async with Engine(trace_path=fresh("fallback"), caches=False, embeddings=False,
                      load_model=faulty_loader(0.5, ("raise",), seed=FAULT_SEED)) as engine:
        # Routed to `code`, whose generation fails; its fallback `conversation` answers.
        await engine.infer("Write a python function that adds two numbers.", temperature=0,
                           max_tokens=32)

    async with Engine(trace_path=fresh("invalid"), caches=False, embeddings=False) as engine:
        for prompt, options in (("hello", {"temperature": 9.0}), ("   ", {}),
                                ("hi", {"agent": "nope"}), ("word " * 3000, {})):
            try:
                await engine.infer(prompt, **options)
            except RequestFailed as exc:
                print(f"invalid as expected: {exc.message[:80]}")


if __name__ == "__main__":
    anyio.run(main)
