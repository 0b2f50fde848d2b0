"""Record the shipped traces again, for real, on the default registry (SmolLM2, greedy).

    .venv/bin/python traces/record.py [NAME ...]

Rewrites success, cache-hit, fallback, invalid and aborts .jsonl beside this file (or only
the NAMEs given); the replay tests (tests/replay/) run on them. Re-record after a trace format
change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from orion_fsm import AdmissionController, CacheSet, Engine, RequestFailed
from orion_fsm.testing.faults import faulty_loader

HERE = Path(__file__).resolve().parent
# The first generation of this plan raises an injected InferenceError, the second does not.
FAULT_SEED = 4


def fresh(name: str) -> Path:
    path = HERE / f"{name}.jsonl"
    path.unlink(missing_ok=True)
    return path


async def success() -> None:
    # Memory-only result caches: an answer cached by an earlier run must not be replayed here.
    async with Engine(trace_path=fresh("success"), caches=CacheSet(None)) as engine:
        # Embedding routing: the trace keeps every agent's score.
        await engine.infer("Write a Python function that checks whether a number is prime.",
                           temperature=0, max_tokens=48)



async def cache_hit() -> None:
    async with Engine(trace_path=fresh("cache-hit"), caches=CacheSet(None),
                      embeddings=False) as engine:
        for _ in range(2):  # the second is served from L1
            await engine.infer("Hello! How are you today?", temperature=0, max_tokens=24)



async def fallback() -> None:
    # retries=False: the failed agent is not retried (retry_same), its fallback answers.
    async with Engine(trace_path=fresh("fallback"), caches=False, embeddings=False,
                      retries=False,
                      load_model=faulty_loader(0.5, ("raise",), seed=FAULT_SEED)) as engine:
        # Routed to `code`, whose first generation fails; the same agent, retried once
        # (`fallback --retry_same--> loading_agent`), answers.
        await engine.infer("Write a python function that adds two numbers.", temperature=0,
                           max_tokens=32)



async def invalid() -> None:
    async with Engine(trace_path=fresh("invalid"), caches=False, embeddings=False) as engine:
        for prompt, options in (("hello", {"temperature": 9.0}), ("   ", {}),
                                ("hi", {"agent": "nope"}), ("word " * 3000, {})):
            try:
                await engine.infer(prompt, **options)
            except RequestFailed as exc:
                print(f"invalid as expected: {exc.message[:80]}")


async def aborts() -> None:
    """A timeout mid-generation, a caller leaving mid-stream, and a request refused meanwhile."""
    admission = AdmissionController(max_in_flight=1, max_queue=0)
    # Every generation hangs after 6 real tokens, as a stuck runtime would.
    async with Engine(trace_path=fresh("aborts"), caches=False, embeddings=False,
                      load_model=faulty_loader(1.0, ("hang",), after_tokens=6),
                      # Below the stall floor (5 s): the deadline, not the watchdog, ends it.
                      timeout_s=3.0, admission=admission) as engine:
        async with engine.stream("Tell me about state machines.", agent="conversation",
                                 temperature=0, max_tokens=32) as texts:
            async for _ in texts:
                break  # the caller leaves after the first chunk
        async with anyio.create_task_group() as group:
            async def timing_out() -> None:
                try:
                    await engine.infer("Explain what a finite state machine is.",
                                       agent="conversation", temperature=0, max_tokens=32)
                except RequestFailed as exc:
                    print(f"timeout as expected: {exc.message[:80]}")

            group.start_soon(timing_out)
            while admission.in_flight < 1:  # the first request holds the only slot
                await anyio.sleep(0.01)
            try:
                await engine.infer("Hello!", max_tokens=8)
            except RequestFailed as exc:
                print(f"overloaded as expected: {exc.message[:80]}")


RECORDINGS = {"success": success, "cache-hit": cache_hit, "fallback": fallback,
              "invalid": invalid, "aborts": aborts}


async def main(names: list[str]) -> None:
    for name in names or RECORDINGS:
        await RECORDINGS[name]()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
