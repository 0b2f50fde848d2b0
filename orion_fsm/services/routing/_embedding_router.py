"""The embedding router: the agent whose routing examples are nearest in meaning to the request.

Owns the agents' example vectors, scoring (nearest examples or centroid), per-agent thresholds,
the degraded path to the rule router, decision caching (L3), and evaluation on labelled texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio

from orion_fsm._exceptions import ConfigurationError, EmbeddingError, OrionError
from orion_fsm._singleflight import SingleFlight
from orion_fsm.services.models._registry import Registry
from orion_fsm.services.routing._embeddings import EmbeddingService, ExpectedText
from orion_fsm.services.routing._router import RoutingDecision, RuleRouter

if TYPE_CHECKING:
    # Imported where used: numpy alone would add ~80 ms to `import orion_fsm`.
    import numpy as np

    from orion_fsm._seams import Router

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_THRESHOLD",
    "DecisionCache",
    "EmbeddingRouter",
    "EvalReport",
    "LabelledText",
    "RouteExplanation",
    "RoutingMethod",
    "decide",
    "evaluate",
    "fit_thresholds",
    "load_labelled",
    "normalize_text",
]

RoutingMethod = Literal["nearest", "centroid"]

# Measured on eval/routing.jsonl (bench/routing.py): "nearest" (mean cosine of the 3 closest
# examples) beats the centroid by 9 points with ~60 examples per agent and ties it (within 2
# texts) with the registry's 15. Scores under 0.1 mean "resembles no agent": real requests
# scored above it, and raising the floor to 0.15 already cost 3 points with 15 examples.
DEFAULT_METHOD: RoutingMethod = "nearest"
DEFAULT_THRESHOLD = 0.1
DEFAULT_TOP_K = 3
# The model reads at most 256 tokens; a long prompt keeps its head and its tail, where
# the actual question usually is.
_HEAD_CHARS, _TAIL_CHARS = 600, 400


class DecisionCache(Protocol):
    """Where routing decisions are kept (L3), as `RoutingDecision.as_dict()` values."""

    def get_memory(self, key: str) -> Any | None: ...

    async def get(self, key: str) -> Any | None: ...

    async def set(self, key: str, value: Any) -> None: ...


def normalize_text(text: str) -> str:
    """The form of a request that is embedded and cached: NFKC, lower case, single spaces.

    The model's tokenizer lowercases anyway, so this changes no vector; it only lets
    "Hello  World" and "hello world" share a cache entry.
    """
    normalized = " ".join(unicodedata.normalize("NFKC", text).split()).lower()
    if len(normalized) > _HEAD_CHARS + _TAIL_CHARS:
        normalized = f"{normalized[:_HEAD_CHARS]} … {normalized[-_TAIL_CHARS:]}"
    return normalized


@dataclass(frozen=True)
class RouteExplanation:
    """A decision with what it was made from: every agent's score and nearest example."""

    decision: RoutingDecision
    scores: Mapping[str, float]  # best first
    nearest: Mapping[str, str]  # each agent's example closest to the request

    def as_dict(self) -> dict[str, Any]:
        return {**self.decision.as_dict(),
                "scores": {a: round(s, 4) for a, s in self.scores.items()},
                "nearest": dict(self.nearest)}


@dataclass(frozen=True)
class _AgentIndex:
    agent: str
    texts: tuple[str, ...]
    vectors: np.ndarray  # (n, dim), unit rows
    centroid: np.ndarray  # (dim,), unit


class EmbeddingRouter:
    """Route by sentence similarity to each agent's routing examples and description.

    Scores are cosines: with `method="nearest"` the mean of the `top_k` closest examples,
    with `"centroid"` the cosine to the mean of the agent's examples. The best agent wins if
    its score reaches its threshold; otherwise the registry's default agent serves. When
    embeddings are unavailable, `fallback_router` (the rule router) decides and the decision
    says `degraded=True`. `extra_examples` adds examples per agent to the registry's.
    """

    def __init__(
        self,
        registry: Registry,
        embeddings: EmbeddingService,
        *,
        fallback_router: Router | None = None,
        thresholds: Mapping[str, float] | None = None,
        default_threshold: float = DEFAULT_THRESHOLD,
        method: RoutingMethod = DEFAULT_METHOD,
        top_k: int = DEFAULT_TOP_K,
        decision_cache: DecisionCache | None = None,
        extra_examples: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if method not in ("nearest", "centroid"):
            raise ConfigurationError("EmbeddingRouter.method", method, "'nearest' or 'centroid'")
        if top_k < 1:
            raise ConfigurationError("EmbeddingRouter.top_k", top_k, "at least 1")
        for name, given in (("thresholds", thresholds), ("extra_examples", extra_examples)):
            unknown = sorted(set(given or {}) - set(registry.agents))
            if unknown:
                raise ConfigurationError(f"EmbeddingRouter.{name}", unknown,
                                         f"keyed by known agents ({', '.join(registry.agents)})")
        self.registry = registry
        self.embeddings = embeddings
        self.fallback_router: Router = fallback_router or RuleRouter(registry)
        self.default_threshold = default_threshold
        self.thresholds: Mapping[str, float] = {
            agent: float((thresholds or {}).get(agent, default_threshold))
            for agent in registry.agents
        }
        self.method: RoutingMethod = method
        self.top_k = top_k
        self.decision_cache = decision_cache
        self.extra_examples = {a: tuple(t) for a, t in (extra_examples or {}).items()}
        self._index: tuple[_AgentIndex, ...] | None = None
        self._building: SingleFlight[tuple[_AgentIndex, ...]] = SingleFlight()
        self._settings = json.dumps(
            [registry.digest, method, top_k, sorted(self.thresholds.items()),
             sorted(self.extra_examples.items())],
            separators=(",", ":"),
        )

    def warm_texts(self) -> list[str]:
        """Every text the router embeds for the agents, as embedded: for `precompute()`."""
        return [normalize_text(t) for agent in self.registry.agents
                for t in self._agent_texts(agent)]

    async def prepare(self) -> bool:
        """Embed the agents' examples now rather than on the first request.

        Returns False, without raising, if embeddings are unavailable: routing then degrades
        to the fallback router, so this is safe to run as a start-up task.
        """
        try:
            await self._agents()
        except EmbeddingError:
            return False
        return True

    async def route(self, text: str, *, requested: str | None) -> RoutingDecision:
        """The agent for `text`: explicit request, cached decision, embeddings, else rules."""
        if requested is not None:
            self.registry.get(requested)  # unknown agent -> RegistryError naming the known ones
            return RoutingDecision(agent=requested, source="explicit", score=1.0)
        normalized = normalize_text(text)
        # Announced from here until queued (the cache lookups may await a disk): a batch
        # gathering meanwhile waits for this text rather than closing just before it comes.
        # Not before the agents' vectors exist: their batch would wait for a text that
        # cannot come before they are encoded.
        with (self.embeddings.expect() if self._index is not None
              else contextlib.nullcontext()) as arriving:
            try:
                key = self._decision_key(normalized) if self.decision_cache is not None else None
                cached = await self._cached(key)
                if cached is not None:
                    return cached
                decision = (await self._explain(normalized, arriving)).decision
            except EmbeddingError as exc:
                if arriving is not None:
                    arriving.arrive()
                return await self._degraded(text, exc)
        if self.decision_cache is not None and key is not None:
            # Unrounded, unlike as_dict(): a cached decision equals the one it replays.
            value = {**decision.as_dict(), "score": decision.score, "margin": decision.margin}
            # A cache that fails to write costs a recomputation later, not the request.
            with contextlib.suppress(Exception):
                await self.decision_cache.set(key, value)
        return decision

    async def explain(self, text: str) -> RouteExplanation:
        """The decision for `text` with every agent's score (never cached, never degraded)."""
        return await self._explain(normalize_text(text))

    # --- internals --------------------------------------------------------------------------

    def _agent_texts(self, agent: str) -> list[str]:
        spec = self.registry.get(agent)
        # The description is one more example: an agent with no examples still has a vector.
        return list(dict.fromkeys([*spec.routing.examples, *self.extra_examples.get(agent, ()),
                                   spec.description]))

    async def _agents(self) -> tuple[_AgentIndex, ...]:
        if self._index is None:
            self._index = await self._building.run("index", self._build_index)
        return self._index

    async def _build_index(self) -> tuple[_AgentIndex, ...]:
        import numpy as np

        per_agent = [(a, self._agent_texts(a)) for a in self.registry.agents]
        flat = [normalize_text(t) for _, texts in per_agent for t in texts]
        vectors = await self.embeddings.embed_many(flat)  # one batch, through the store
        index, start = [], 0
        for agent, texts in per_agent:
            matrix = np.stack(vectors[start:start + len(texts)]).astype(np.float32)
            start += len(texts)
            centroid = matrix.mean(axis=0)
            centroid /= np.linalg.norm(centroid)
            index.append(_AgentIndex(agent, tuple(texts), matrix, centroid))
        return tuple(index)

    async def _explain(self, normalized: str,
                       arriving: ExpectedText | None = None) -> RouteExplanation:
        import numpy as np

        agents = await self._agents()
        vector, batch = await self.embeddings.embed_batched(normalized, arriving=arriving)
        scores: dict[str, float] = {}
        nearest: dict[str, str] = {}
        for entry in agents:
            sims = entry.vectors @ vector
            nearest[entry.agent] = entry.texts[int(np.argmax(sims))]
            if self.method == "centroid":
                scores[entry.agent] = float(entry.centroid @ vector)
            else:
                k = min(self.top_k, len(sims))
                scores[entry.agent] = float(np.partition(sims, len(sims) - k)[-k:].mean())
        decision = replace(self.decide(scores, nearest=nearest), batch=batch)
        return RouteExplanation(decision=decision, scores=decision.scores, nearest=nearest)

    def decide(self, scores: Mapping[str, float],
               nearest: Mapping[str, str] | None = None) -> RoutingDecision:
        """The decision from every agent's score, with this router's thresholds (pure)."""
        return decide(scores, default_agent=self.registry.default_agent,
                      thresholds=self.thresholds, nearest=nearest)

    def _decision_key(self, normalized: str) -> str:
        material = f"{self._settings}\0{self.embeddings.model_id}\0{normalized}"
        return hashlib.sha256(material.encode()).hexdigest()

    async def _cached(self, key: str | None) -> RoutingDecision | None:
        if self.decision_cache is None or key is None:
            return None
        try:
            value = self.decision_cache.get_memory(key)
            if value is None:
                value = await self.decision_cache.get(key)
        except Exception:
            return None  # a failing cache is a miss: routing must not depend on it
        return _decision_from_dict(value)

    async def _degraded(self, text: str, exc: EmbeddingError) -> RoutingDecision:
        decision = await self.fallback_router.route(text, requested=None)
        return replace(decision, degraded=True, note=f"embedding-unavailable: {exc.message}")


def decide(scores: Mapping[str, float], *, default_agent: str,
           thresholds: Mapping[str, float] | None = None,
           nearest: Mapping[str, str] | None = None) -> RoutingDecision:
    """The embedding router's decision from every agent's score, and nothing else.

    The best agent serves if its score reaches its threshold (`DEFAULT_THRESHOLD` for an
    agent `thresholds` does not name); otherwise `default_agent` does. Pure, so that a
    recorded request's scores replay through the current thresholds (`orion-fsm replay`).
    """
    if not scores:
        raise ValueError("decide() needs at least one agent score")
    # Stable sort: on a tie the agent listed first (registry order) wins.
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    best, score = ranked[0]
    runner_up, second = ranked[1] if len(ranked) > 1 else (None, 0.0)
    threshold = (thresholds or {}).get(best, DEFAULT_THRESHOLD)
    above = score >= threshold
    return RoutingDecision(
        agent=best if above else default_agent,
        source="embedding" if above else "default",
        score=score,
        runner_up=runner_up,
        margin=score - second,
        matched=(nearest[best],) if nearest and best in nearest else (),
        note=None if above else (
            f"best agent {best!r} scored {score:.3f}, below its threshold {threshold:.3f}"),
        scores=dict(ranked),
    )


def _decision_from_dict(value: Any) -> RoutingDecision | None:
    """A cached decision back to a value; anything malformed is a miss, not an error."""
    if not isinstance(value, Mapping) or value.get("source") not in ("embedding", "default"):
        return None
    try:
        return RoutingDecision(
            agent=str(value["agent"]), source=value["source"], score=float(value["score"]),
            runner_up=value.get("runner_up"), margin=float(value.get("margin", 0.0)),
            matched=tuple(value.get("matched", ())), note=value.get("note"),
            scores={str(a): float(s) for a, s in (value.get("scores") or {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


# --- evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledText:
    text: str
    agent: str


def load_labelled(path: Path | str, registry: Registry | None = None) -> list[LabelledText]:
    """Read a JSONL file of `{"text": ..., "agent": ...}` lines; errors name the line."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise OrionError(f"cannot read labelled file {str(file)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise OrionError(f"labelled file {str(file)!r} is not UTF-8 text (byte {exc.start}); "
                         "write one JSON object per line") from None
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, agent = row["text"], row["agent"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
            raise OrionError(f"{file}:{number}: expected a JSON object with \"text\" and "
                             f"\"agent\" ({type(exc).__name__}: {exc})") from None
        if not isinstance(text, str) or not isinstance(agent, str) or not text.strip():
            raise OrionError(f"{file}:{number}: \"text\" and \"agent\" must be non-empty "
                             f"strings, got {type(text).__name__} and {type(agent).__name__}")
        sample = LabelledText(text=text, agent=agent)
        if registry is not None and sample.agent not in registry.agents:
            raise OrionError(f"{file}:{number}: unknown agent {sample.agent!r}; known agents: "
                             f"{', '.join(registry.agents)}")
        samples.append(sample)
    if not samples:
        raise OrionError(f"{file} holds no labelled texts")
    return samples


@dataclass(frozen=True)
class EvalReport:
    """Accuracy, per-agent precision and recall, and the confusion matrix (true -> predicted)."""

    agents: tuple[str, ...]
    total: int
    correct: int
    confusion: Mapping[str, Mapping[str, int]]
    degraded: int = 0
    mistakes: tuple[tuple[str, str, str], ...] = field(default=())  # (text, true, predicted)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def precision(self, agent: str) -> float:
        predicted = sum(self.confusion[t][agent] for t in self.agents)
        return self.confusion[agent][agent] / predicted if predicted else 0.0

    def recall(self, agent: str) -> float:
        actual = sum(self.confusion[agent].values())
        return self.confusion[agent][agent] / actual if actual else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "correct": self.correct, "accuracy": round(self.accuracy, 4),
            "degraded": self.degraded,
            "per_agent": {a: {"precision": round(self.precision(a), 4),
                              "recall": round(self.recall(a), 4),
                              "support": sum(self.confusion[a].values())} for a in self.agents},
            "confusion": {t: dict(row) for t, row in self.confusion.items()},
            "mistakes": [{"text": t, "agent": a, "predicted": p} for t, a, p in self.mistakes],
        }


async def evaluate(router: Router, samples: Sequence[LabelledText], *,
                   concurrency: int = 64) -> EvalReport:
    """Route every sample (`concurrency` at a time, so embeddings batch) and score the result."""
    decisions: list[RoutingDecision | None] = [None] * len(samples)
    limiter = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            decisions[i] = await router.route(samples[i].text, requested=None)

    async with anyio.create_task_group() as tg:
        for i in range(len(samples)):
            tg.start_soon(one, i)
    agents = tuple(dict.fromkeys([*(s.agent for s in samples),
                                  *(d.agent for d in decisions if d is not None)]))
    confusion = {t: dict.fromkeys(agents, 0) for t in agents}
    mistakes = []
    degraded = 0
    for sample, decision in zip(samples, decisions, strict=True):
        assert decision is not None
        confusion[sample.agent][decision.agent] += 1
        degraded += decision.degraded
        if decision.agent != sample.agent:
            mistakes.append((sample.text, sample.agent, decision.agent))
    correct = sum(confusion[a][a] for a in agents)
    return EvalReport(agents=agents, total=len(samples), correct=correct, confusion=confusion,
                      degraded=degraded, mistakes=tuple(mistakes))


def fit_thresholds(labelled: Iterable[tuple[str, RouteExplanation]],
                   default_agent: str) -> dict[str, float]:
    """Per-agent thresholds that maximise accuracy on (true agent, explanation) pairs.

    A text whose best agent scores below that agent's threshold goes to the default agent,
    so each threshold trades the agent's right answers against texts the default agent
    should have had. Among equally good thresholds the lowest is kept (it routes more).
    """
    by_best: dict[str, list[tuple[float, str]]] = {}
    for truth, explanation in labelled:
        best, score = next(iter(explanation.scores.items()))
        by_best.setdefault(best, []).append((score, truth))
    thresholds: dict[str, float] = {}
    for agent, rows in by_best.items():
        if agent == default_agent:
            thresholds[agent] = 0.0  # below it the default agent serves anyway
            continue
        rows.sort()
        # Threshold candidates: 0, then midway between consecutive scores.
        candidates = [0.0] + [(a[0] + b[0]) / 2 for a, b in itertools.pairwise(rows)]
        candidates.append(rows[-1][0] + 1e-6)
        best_t, best_correct = 0.0, -1
        for t in candidates:
            correct = sum((truth == agent) if score >= t else (truth == default_agent)
                          for score, truth in rows)
            if correct > best_correct:
                best_t, best_correct = t, correct
        thresholds[agent] = round(best_t, 4)
    return thresholds
