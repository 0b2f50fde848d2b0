"""How a replayed request differs from its recording: `compare` walks the path (each phase's
decisions, then the transition that left it) and then the outputs; `ReplayReport` holds the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

ReplayMode = Literal["recorded", "live"]

# What each phase decided, as its span attributes say; compared in path order, so the first
# divergence named is the cause, not one of its consequences. Outputs (token counts, finish
# reasons) are compared after the path, token by token.
_ERRORS: Final = ("error.type", "orion.error")
_DECISIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "validating": _ERRORS,
    "routing": ("orion.agent", "orion.routing.source", "orion.fallback_chain", "cache.level",
                *_ERRORS),
    "loading_agent": ("orion.agent", "orion.attempt", "orion.breaker", "orion.load_error",
                      *_ERRORS),
    "inferencing": ("orion.inference_error", *_ERRORS),
    "fallback": ("orion.fallback.from", "orion.fallback.to", *_ERRORS),
    "serving_virtual": ("orion.virtual.members", "orion.virtual.early_stop.taken",
                        "orion.virtual.early_stop.at_token", "orion.virtual.code_at",
                        "orion.virtual.outcomes", "orion.virtual.joins", *_ERRORS),
    "fusing": ("orion.virtual.used", *_ERRORS),
}
# Decisions that records written before them lack: not compared on such a record.
_ADDED_LATER: Final = frozenset({"orion.virtual.early_stop.at_token", "orion.virtual.code_at"})
_PARALLEL: Final = "serving_virtual"  # the parallel state: its regions are compared apart
_SHOWN_CHARS: Final = 160


class Verbatim(str):
    """A value shown as it is (a transition), not quoted like recorded text."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= _SHOWN_CHARS else shown[: _SHOWN_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where a replay first left the recorded run: the state, the field, both values."""

    state: str | None
    field: str
    recorded: Any
    replayed: Any

    def __str__(self) -> str:
        where = f"at {self.state}: " if self.state else ""
        return (f"{where}{self.field}: recorded {_show(self.recorded)}, "
                f"replayed {_show(self.replayed)}")

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "field": self.field, "recorded": self.recorded,
                "replayed": self.replayed}


@dataclass(frozen=True)
class ReplayReport:
    """The outcome of replaying one recorded request. `ok` when nothing diverged."""

    request_id: str
    mode: ReplayMode
    divergences: tuple[Divergence, ...]
    warnings: tuple[str, ...]  # what may explain a divergence (another registry, model file)
    skipped: tuple[str, ...]  # comparisons not made, and why
    elapsed_ms: float
    recorded: Mapping[str, Any] = field(repr=False)
    replayed: Mapping[str, Any] | None = field(repr=False)

    @property
    def ok(self) -> bool:
        return not self.divergences

    @property
    def first(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None

    def summary(self) -> str:
        """One line: `PASS id path (ms)` or `FAIL id <first divergence>`."""
        if self.first is not None:
            return f"FAIL {self.request_id} {self.first}"
        states = [t.get("target", "?") for t in self.recorded.get("transitions") or []]
        return f"PASS {self.request_id} {' → '.join(states)} ({self.elapsed_ms:.1f} ms)"

    def as_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "mode": self.mode, "ok": self.ok,
                "divergences": [d.as_dict() for d in self.divergences],
                "warnings": list(self.warnings), "skipped": list(self.skipped),
                "elapsed_ms": round(self.elapsed_ms, 3)}
def _transition(t: Mapping[str, Any] | None) -> Verbatim:
    if t is None:
        return Verbatim("(no transition)")
    return Verbatim(f"{t.get('source')} --{t.get('event')}--> {t.get('target')}")


def compare(recorded: Mapping[str, Any], replayed: Mapping[str, Any], *, outputs: bool = True,
            text: bool = True) -> list[Divergence]:
    """How `replayed` differs from `recorded` (two trace records of one request).

    The path first: each phase's decisions, then the transition that left it, in order;
    the first difference is the only one reported, since everything after it follows from
    it. On the same path, the outputs: agent, fallback, cache, error, finish reason, prompt
    and generated token ids (the first differing index), and the text if `text`.
    """
    return (path_divergences(recorded, replayed)
            or output_divergences(recorded, replayed, outputs=outputs, text=text))


def path_divergences(recorded: Mapping[str, Any], replayed: Mapping[str, Any], *,
                      until_abort: bool = False) -> list[Divergence]:
    # A parallel state's regions interleave as their members ran: each is compared apart,
    # before the transition that leaves the parallel state.
    rt = [t for t in recorded.get("transitions") or [] if t.get("region") is None]
    pt = [t for t in replayed.get("transitions") or [] if t.get("region") is None]
    rp = list(recorded.get("phases") or [])
    pp = list(replayed.get("phases") or [])
    if until_abort and rt and rt[-1].get("event") == "abort":
        # Up to the phase the caller cancelled, which a live run does not cancel.
        rt, rp = rt[:-1], rp[: len(rt) - 2]
        pt, pp = pt[: len(rt)], pp[: len(rp)]
    for i in range(max(len(rt), len(pt))):
        if i < len(rt) and rt[i].get("source") == _PARALLEL:
            found = region_divergences(recorded, replayed)
            if found:
                return found
        if i >= 1 and i - 1 < len(rp) and i - 1 < len(pp):
            divergence = phase_divergence(rp[i - 1], pp[i - 1])
            if divergence is not None:
                return [divergence]
        r, p = (rt[i] if i < len(rt) else None), (pt[i] if i < len(pt) else None)
        key = ("event", "source", "target")
        if r is None or p is None or any(r.get(k) != p.get(k) for k in key):
            state = (r or p or {}).get("source")
            return [Divergence(state, f"transition {i}", _transition(r), _transition(p))]
    return []


def region_divergences(recorded: Mapping[str, Any],
                       replayed: Mapping[str, Any]) -> list[Divergence]:
    """The first transition of a region (a virtual agent's member) that differs, named by
    its region."""
    def walk(record: Mapping[str, Any], region: str) -> list[Mapping[str, Any]]:
        return [t for t in record.get("transitions") or [] if t.get("region") == region]

    regions = dict.fromkeys(t.get("region") for record in (recorded, replayed)
                            for t in record.get("transitions") or [] if t.get("region"))
    for region in regions:
        rt, pt = walk(recorded, str(region)), walk(replayed, str(region))
        for i in range(max(len(rt), len(pt))):
            r, p = (rt[i] if i < len(rt) else None), (pt[i] if i < len(pt) else None)
            if r is None or p is None or any(r.get(k) != p.get(k)
                                             for k in ("event", "source", "target")):
                return [Divergence(str(region), f"region {region}: transition {i}",
                                   _transition(r), _transition(p))]
    return []


def member_divergences(recorded: Mapping[str, Any],
                       replayed: Mapping[str, Any]) -> list[Divergence]:
    """Each member's outcome, agent and generated ids, named by its region."""
    def members(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        return {str(m.get("role")): m for m in (record.get("virtual") or {}).get("members") or []}

    r_members, p_members = members(recorded), members(replayed)
    found: list[Divergence] = []
    for role in dict.fromkeys([*r_members, *p_members]):
        r, p = r_members.get(role) or {}, p_members.get(role) or {}
        for name in ("state", "agent", "agents_tried", "finish_reason", "used"):
            if r.get(name) != p.get(name):
                found.append(Divergence(role, f"members.{role}.{name}", r.get(name),
                                        p.get(name)))
        divergence = _first_difference(f"members.{role}.token_ids", role,
                                       list(r.get("token_ids") or ()),
                                       list(p.get("token_ids") or ()))
        if divergence is not None:
            found.append(divergence)
    return found


def phase_divergence(recorded: Mapping[str, Any],
                      replayed: Mapping[str, Any]) -> Divergence | None:
    state = str(recorded.get("state"))
    r_attrs: Mapping[str, Any] = recorded.get("attributes") or {}
    p_attrs: Mapping[str, Any] = replayed.get("attributes") or {}
    # A verdict recorded without when it was taken: a record from before these existed.
    older = ("orion.virtual.early_stop.taken" in r_attrs
             and "orion.virtual.early_stop.at_token" not in r_attrs)
    for name in _DECISIONS.get(state, _ERRORS):
        if older and name in _ADDED_LATER:
            continue
        if r_attrs.get(name) != p_attrs.get(name):
            return Divergence(state, name, r_attrs.get(name), p_attrs.get(name))
    return None


def output_divergences(recorded: Mapping[str, Any], replayed: Mapping[str, Any], *,
                        outputs: bool, text: bool) -> list[Divergence]:
    r: Mapping[str, Any] = recorded.get("result") or {}
    p: Mapping[str, Any] = replayed.get("result") or {}
    final = str(r.get("state"))
    producer = "routing" if r.get("cache") else "inferencing"
    found: list[Divergence] = []
    for name, state in (("agent", "loading_agent"), ("requested_agent", "routing"),
                        ("agents_tried", "loading_agent"), ("fallback", "fallback"),
                        ("cache", "routing"), ("error_reason", final), ("error", final)):
        if r.get(name) != p.get(name):
            found.append(Divergence(state, f"result.{name}", r.get(name), p.get(name)))
    if not outputs:
        return found
    found += member_divergences(recorded, replayed)
    if r.get("finish_reason") != p.get("finish_reason"):
        found.append(Divergence(producer, "result.finish_reason", r.get("finish_reason"),
                                p.get("finish_reason")))
    # Ids the trace writer dropped (they decoded to a redacted secret) are not compared.
    dropped = recorded.get("redacted") or ()
    for name, state, rv, pv in (
        ("prompt_token_ids", "loading_agent", recorded.get("prompt_token_ids"),
         replayed.get("prompt_token_ids")),
        ("result.token_ids", producer, r.get("token_ids"), p.get("token_ids")),
    ):
        if name in dropped:
            continue
        divergence = _first_difference(name, state, list(rv or ()), list(pv or ()))
        if divergence is not None:
            found.append(divergence)
    if text and r.get("text") != p.get("text"):
        found.append(Divergence(producer, "result.text", r.get("text"), p.get("text")))
    return found


def _first_difference(name: str, state: str, recorded: list[Any],
                      replayed: list[Any]) -> Divergence | None:
    for i, (a, b) in enumerate(zip(recorded, replayed, strict=False)):
        if a != b:
            return Divergence(state, f"{name}[{i}] (of {len(recorded)})", a, b)
    if len(recorded) != len(replayed):
        return Divergence(state, f"{name}: length", len(recorded), len(replayed))
    return None
