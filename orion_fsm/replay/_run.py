"""Replaying one recorded request: the registry and tokenizers it names, looked up on this
machine; a fresh engine on the stand-ins (or, live, the real models); its trace line compared.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import anyio
from opentelemetry.sdk.trace import TracerProvider

from orion_fsm._config import resolve_cache_dir
from orion_fsm._engine import Engine
from orion_fsm._exceptions import ModelLoadError, OrionError, RequestFailed
from orion_fsm._resources import data_file
from orion_fsm._types import GenerationParams, Message
from orion_fsm.backends import Tokenizer
from orion_fsm.backends._convert import TOKENIZER_FILENAME
from orion_fsm.services.models._loader import ModelLoader
from orion_fsm.services.models._registry import Registry
from orion_fsm.services.observability._sanitize import redaction
from orion_fsm.services.observability._tracefile import read_traces, upgrade_record

from ._adapters import (
    LiveLoader,
    RecordedContexts,
    ReplayAdmission,
    ReplayBreakers,
    ReplayLoader,
    ReplayRetries,
    ReplayRouter,
    replay_caches,
    replay_clock,
)
from ._compare import Divergence, ReplayReport, Verbatim, output_divergences, path_divergences
from ._script import Aborter, Script

# Aborts a live replay still delivers: they arrive before any model is touched.
_DELIVERED_LIVE: Final = frozenset({"admission", "route"})
_REDACTED: Final = redaction("").removesuffix("]")  # how the trace writer marks a secret


# --- the registry the trace names -----------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _load_registry(path: Path | None, _stamp: tuple[int, int]) -> Registry:
    return Registry.load(path)


def _registry_at(path: Path | None) -> Registry:
    file = data_file("models.json") if path is None else path.expanduser().resolve()
    stat = file.stat()
    # Keyed by size and mtime: a registry edited between two replays is read again.
    return _load_registry(None if path is None else file, (stat.st_mtime_ns, stat.st_size))


def _resolve_registry(record: Mapping[str, Any], registry: Registry | str | Path | None = None
                      ) -> tuple[Registry, list[str]]:
    """The registry to replay `record` with, and warnings.

    An explicit `registry` is used as given (a warning if its digest is not the recorded
    one); otherwise the recorded `registry_source` if its digest matches, else the packaged
    registry (a warning if it does not match either).
    """
    digest = record.get("registry_digest")
    if registry is not None:
        given = registry if isinstance(registry, Registry) else _registry_at(Path(registry))
        return given, _digest_warning(digest, given)
    source = record.get("registry_source")
    if source:
        try:
            named = _registry_at(Path(source))
        except (OrionError, OSError):
            named = None
        if named is not None and named.digest == digest:
            return named, []
    packaged = _registry_at(None)
    return packaged, _digest_warning(digest, packaged)


def _digest_warning(digest: object, registry: Registry) -> list[str]:
    if digest is None or registry.digest == digest:
        return []
    where = registry.source or "the given registry"
    return [f"the trace was recorded with registry {str(digest)[:12]}…, replayed with {where} "
            f"({registry.digest[:12]}…): agents, prompts or routing hints may differ"]


# --- tokenizers -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _tokenizer_at(path: Path, _stamp: tuple[int, int]) -> Tokenizer:
    return Tokenizer.from_file(path)


def _find_tokenizers(script: Script, record: Mapping[str, Any],
                     cache_dir: Path) -> dict[str, Tokenizer]:
    """sha256 -> tokenizer, for the recorded models whose tokenizer.json is on this machine:
    the converted copy in the model cache, or the one beside the recorded source file."""
    source = (record.get("model") or {}).get("source")
    final_sha = (record.get("model") or {}).get("sha256")
    found: dict[str, Tokenizer] = {}
    for sha in {a.sha256 for a in script.attempts.values() if a.sha256}:
        candidates = [cache_dir / sha[:16] / TOKENIZER_FILENAME]
        if source and sha == final_sha:
            candidates.append(Path(source).parent / TOKENIZER_FILENAME)
        for path in candidates:
            try:
                stat = path.stat()
                found[sha] = _tokenizer_at(path, (stat.st_mtime_ns, stat.st_size))
                break
            except (OSError, ModelLoadError):
                continue
    return found


# --- the run --------------------------------------------------------------------------------


@functools.cache
def _tracer_provider() -> TracerProvider:
    # One private provider for every replay: building one per engine costs more than a replay.
    return TracerProvider()


def _params(raw: object) -> GenerationParams:
    if not isinstance(raw, Mapping):
        raise OrionError(f"the trace record's request.params is a {type(raw).__name__}, not an "
                         "object: the record was not written by orion-fsm (or was edited)")
    known = {name: raw[name] for name in GenerationParams.__slots__ if name in raw}
    if isinstance(known.get("stop"), list):
        known["stop"] = tuple(known["stop"])
    return GenerationParams(**known)


def _live_params(record: Mapping[str, Any], params: GenerationParams
                 ) -> tuple[GenerationParams, str | None]:
    """The parameters that make a live run comparable, or why its outputs are not."""
    sampling = record.get("sampling") or {}
    if (record.get("cache") or {}).get("level") or not sampling:
        return params, None
    if float(sampling.get("temperature", 0.0)) <= 0:
        return params, None
    seed = sampling.get("seed")
    if isinstance(seed, int) and seed >= 0:
        # The seed the recorded run sampled with (drawn by the engine when none was asked).
        return replace(params, seed=seed), None
    return params, ("tokens and text: the recorded run sampled (temperature "
                    f"{sampling.get('temperature')}) with a random seed the trace does not hold")


async def _send(engine: Engine, record: Mapping[str, Any], params: GenerationParams,
                aborter: Aborter) -> None:
    request = record.get("request") or {}
    # Contents as recorded, text or not: a prompt refused for its type must be refused again.
    messages = [Message(str(m.get("role", "")), m.get("content"))  # type: ignore[arg-type]
                if isinstance(m, dict) else Message("", m)
                for m in request.get("messages") or []]
    options: dict[str, Any] = {"agent": request.get("agent"), "params": params,
                               "cache": request.get("cache"),
                               # The format compiles again: its mask re-checks every token.
                               "response_format": request.get("response_format"),
                               "tools": request.get("tools"),
                               "tool_choice": request.get("tool_choice"),
                               "session_id": request.get("session_id"),
                               "context": request.get("context"),
                               "context_top_k": request.get("context_top_k")}
    with anyio.CancelScope() as scope:
        aborter.scope = scope
        try:
            if record.get("streaming"):
                async with engine.stream(messages, **options) as stream:
                    async for _ in stream:
                        pass
            else:
                await engine.infer(messages, **options)
        except RequestFailed:
            pass  # the trace line says how it failed; that is what is compared


async def replay(
    record: Mapping[str, Any], *, registry: Registry | str | Path | None = None,
    machine: str | Path | None = None, thresholds: Mapping[str, float] | None = None,
    live: bool = False, cache_dir: str | Path | None = None,
) -> ReplayReport:
    """Replay one recorded request on a fresh engine and compare it with the recording.

    `registry`, `machine` (a statechart file) and `thresholds` (embedding routing) replace
    the current ones, to see what a change would do to recorded traffic. Without `live`, no
    model is loaded: the adapters serve the recorded effects. With `live`, the real models
    (from `cache_dir`) generate where the recorded run generated, and the outputs are
    compared token by token.
    """
    started = time.perf_counter()
    record = upgrade_record(dict(record))
    request_id = str(record.get("request_id", "?"))
    resolved, warnings = await anyio.to_thread.run_sync(_resolve_registry, record, registry)
    script = Script.from_record(record)
    warnings += script.warnings
    root = resolve_cache_dir(cache_dir)
    clock = replay_clock(record)
    aborter = Aborter(script.abort)
    skipped: list[str] = []
    params = _params((record.get("request") or {}).get("params") or {})
    redacted = _REDACTED in json.dumps((record.get("request") or {}).get("messages"),
                                       ensure_ascii=False)
    if redacted:
        # The trace writer redacts secrets and personal data: the replayed prompt is not the
        # recorded one, so its tokens are taken from the trace instead of encoded again.
        warnings.append("the recorded prompt was redacted (secrets or personal data): replay "
                        "sends the redacted text, so rule routing and the result cache key "
                        "may differ from the recording")
    router = ReplayRouter(record, resolved, thresholds=thresholds, aborter=aborter)
    replay_loader: ReplayLoader | None = None
    live_loader: LiveLoader | None = None
    loader: ReplayLoader | LiveLoader
    if live:
        live_loader = loader = LiveLoader(ModelLoader(root, clock=clock), script)
        params, why = _live_params(record, params)
        if why is not None:
            skipped.append(why)
        if script.abort is not None and script.abort.point not in _DELIVERED_LIVE:
            aborter = Aborter(None)
            skipped.append(f"the recorded request ended in {script.abort.reason} at "
                           f"{script.abort.point}: a live run is not aborted at the same point, "
                           "so only its path up to the abort is compared")
    else:
        tokenizers = await anyio.to_thread.run_sync(_find_tokenizers, script, record, root)
        replay_loader = loader = ReplayLoader(script, record=record, tokenizers=tokenizers,
                                              clock=clock, aborter=aborter,
                                              encode_prompts=not redacted)
    # The breaker board and the deadline are effects too: refuse where the recorded run was
    # refused, retry where it retried.
    breakers = ReplayBreakers(script.refusals(), record.get("breakers"), clock=clock,
                              retry_after_s=(record.get("result") or {}).get("retry_after_s"))
    with tempfile.TemporaryDirectory(prefix="orion-replay-") as folder:
        trace_file = Path(folder) / "replay.jsonl"
        engine = Engine(
            resolved, router=router, loader=loader,
            caches=replay_caches(record, clock), clock=clock, embeddings=False,
            warm_up=False, trace_path=trace_file, tracer_provider=_tracer_provider(),
            machine=machine, memory_interval_s=3600.0, breakers=breakers,
            admission=ReplayAdmission(aborter),
            retries=ReplayRetries(script.retries, script.same_model),
            contexts=RecordedContexts(record))
        failure: str | None = None
        try:
            async with engine:
                await _send(engine, record, params, aborter)
        except Exception as exc:  # a broken statechart or phase: report it, do not crash
            failure = f"{type(exc).__name__}: {exc}"
        replayed_records = await anyio.to_thread.run_sync(
            lambda: list(read_traces(trace_file)) if trace_file.exists() else [])
    warnings += router.warnings + (live_loader.warnings if live_loader else [])
    replayed = replayed_records[-1] if replayed_records else None
    if replayed is None:
        divergences = [Divergence(None, "trace line", "one record",
                                  Verbatim(failure or "none written"))]
    else:
        until_abort = (live and script.abort is not None
                       and script.abort.point not in _DELIVERED_LIVE)
        divergences = path_divergences(record, replayed, until_abort=until_abort)
        if divergences:
            skipped.clear()  # the outputs of another path are not compared at all
        elif not until_abort:
            decoded = live or (replay_loader is not None
                               and replay_loader.decodes(_final_agent(record)))
            if not decoded and (record.get("result") or {}).get("token_ids"):
                skipped.append("text: no tokenizer.json of the recorded model here, so the "
                               "recorded text is replayed as it is and only token ids are "
                               "compared")
            divergences = output_divergences(record, replayed, text=decoded, outputs=not (
                live and any(s.startswith("tokens and text") for s in skipped)))
        if failure is not None:
            divergences.append(Divergence(None, "replay", "no error", Verbatim(failure)))
    return ReplayReport(
        request_id=request_id, mode="live" if live else "recorded",
        divergences=tuple(divergences), warnings=tuple(dict.fromkeys(warnings)),
        skipped=tuple(skipped), elapsed_ms=(time.perf_counter() - started) * 1e3,
        recorded=record, replayed=replayed)


def _final_agent(record: Mapping[str, Any]) -> str:
    result = record.get("result") or {}
    return str(result.get("agent") or (result.get("routing") or {}).get("agent") or "")
