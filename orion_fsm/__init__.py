"""orion_fsm: serve local language models through an explicit, per-request async state machine.

    async with Engine() as engine:
        result = await engine.infer("What is the capital of France?")
        async for text in engine.stream("Tell me a story"):
            print(text, end="")
"""

from ._clock import Clock, ManualClock, SystemClock
from ._config import (
    TRACE_FILE_ENV,
    caches_dir,
    contexts_dir,
    default_cache_dir,
    default_trace_path,
    repl_history_path,
    resolve_cache_dir,
)
from ._engine import Engine, ResponseStream
from ._exceptions import (
    ConfigurationError,
    ContextError,
    InferenceError,
    InsufficientMemory,
    ModelError,
    ModelLoadError,
    OrionError,
    RegistryError,
    RequestFailed,
    ValidationError,
)
from ._machine import request_chart
from ._seams import ContextSource, Loader, Router
from ._types import (
    Citation,
    GenerationParams,
    Message,
    PhaseTiming,
    Request,
    Result,
    TokenUsage,
)
from .backends import ConvertedModel, LoadedModel, ModelCache
from .services.caches._cacheset import LEVELS as CACHE_LEVELS
from .services.caches._cacheset import CacheConfig, CacheSet, CacheStats
from .services.context._chunker import ChunkingConfig
from .services.context._eval import (
    ContextEval,
    ContextQuestion,
    evaluate_context,
    load_questions,
)
from .services.context._store import AddResult, ContextHit, ContextStats, ContextStore
from .services.models._loader import LoaderConfig, ModelLoader
from .services.models._memory import MemoryMonitor
from .services.models._pressure import PressureLevel, PressureThresholds
from .services.models._registry import AgentSpec, Registry
from .services.models._tiers import MemoryEstimate, estimate_model_memory
from .services.observability._logging import configure_logging
from .services.observability._tracefile import find_traces, read_traces
from .services.resilience._breaker import BreakerBoard, BreakerConfig
from .services.resilience._guardrails import GuardrailConfig, Guardrails
from .services.routing._embedding_router import DEFAULT_METHOD as DEFAULT_ROUTING_METHOD
from .services.routing._embedding_router import (
    EmbeddingRouter,
    EvalReport,
    LabelledText,
    RouteExplanation,
    fit_thresholds,
    load_labelled,
)
from .services.routing._embedding_router import evaluate as evaluate_router
from .services.routing._embeddings import EmbeddingError, EmbeddingService
from .services.routing._router import RoutingDecision, RuleRouter

__version__ = "0.1.0"

__all__ = [
    "CACHE_LEVELS",
    "DEFAULT_ROUTING_METHOD",
    "TRACE_FILE_ENV",
    "AddResult",
    "AgentSpec",
    "BreakerBoard",
    "BreakerConfig",
    "CacheConfig",
    "CacheSet",
    "CacheStats",
    "ChunkingConfig",
    "Citation",
    "Clock",
    "ConfigurationError",
    "ContextError",
    "ContextEval",
    "ContextHit",
    "ContextQuestion",
    "ContextSource",
    "ContextStats",
    "ContextStore",
    "ConvertedModel",
    "EmbeddingError",
    "EmbeddingRouter",
    "EmbeddingService",
    "Engine",
    "EvalReport",
    "GenerationParams",
    "GuardrailConfig",
    "Guardrails",
    "InferenceError",
    "InsufficientMemory",
    "LabelledText",
    "LoadedModel",
    "Loader",
    "LoaderConfig",
    "ManualClock",
    "MemoryEstimate",
    "MemoryMonitor",
    "Message",
    "ModelCache",
    "ModelError",
    "ModelLoadError",
    "ModelLoader",
    "OrionError",
    "PhaseTiming",
    "PressureLevel",
    "PressureThresholds",
    "Registry",
    "RegistryError",
    "Request",
    "RequestFailed",
    "ResponseStream",
    "Result",
    "RouteExplanation",
    "Router",
    "RoutingDecision",
    "RuleRouter",
    "SystemClock",
    "TokenUsage",
    "ValidationError",
    "__version__",
    "caches_dir",
    "configure_logging",
    "contexts_dir",
    "default_cache_dir",
    "default_trace_path",
    "estimate_model_memory",
    "evaluate_context",
    "evaluate_router",
    "find_traces",
    "fit_thresholds",
    "load_labelled",
    "load_questions",
    "read_traces",
    "repl_history_path",
    "request_chart",
    "resolve_cache_dir",
]
