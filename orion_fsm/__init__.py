"""orion_fsm: serve local language models through an explicit, per-request async state machine.

    async with Engine() as engine:
        result = await engine.infer("What is the capital of France?")
        async for text in engine.stream("Tell me a story"):
            print(text, end="")
"""

from ._clock import Clock, ManualClock, SystemClock
from ._config import (
    API_KEY_ENV,
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SHUTDOWN_GRACE_S,
    FEEDBACK_FILE_ENV,
    SERVER_ENV,
    TRACE_FILE_ENV,
    caches_dir,
    contexts_dir,
    default_cache_dir,
    default_feedback_path,
    default_trace_path,
    models_dir,
    repl_history_path,
    resolve_cache_dir,
    tuned_models_dir,
    user_registry_path,
)
from ._engine import Engine, EngineStats, ResponseStream
from ._exceptions import (
    ConfigurationError,
    ContextError,
    EvaluationError,
    FeedbackError,
    GenerationStalled,
    InferenceError,
    InsufficientMemory,
    ModelError,
    ModelFileError,
    ModelLoadError,
    OrionError,
    RegistryError,
    RequestFailed,
    TuningError,
    ValidationError,
)
from ._machine import request_chart
from ._seams import ContextSource, Loader, Router
from ._session import Session, SessionStream
from ._types import (
    Citation,
    GenerationParams,
    MemberResult,
    Message,
    PhaseTiming,
    Request,
    Result,
    TokenUsage,
    ToolCall,
)
from .backends import ConvertedModel, LoadedModel, ModelCache
from .evaluation import (
    AgentScore,
    Answer,
    AnswerCheck,
    AnswerQuestion,
    AnswerReport,
    Comparison,
    EvalProgress,
    Tally,
    compare,
    load_answer_set,
)
from .evaluation import evaluate as evaluate_answers
from .services.caches._cacheset import LEVELS as CACHE_LEVELS
from .services.caches._cacheset import CacheConfig, CacheSet, CacheStats
from .services.context._chunker import ChunkingConfig
from .services.context._eval import (
    ContextEval,
    ContextQuestion,
    evaluate_context,
    load_questions,
)
from .services.context._rerank import Reranker
from .services.context._store import ContextStore
from .services.context._store_values import AddResult, ContextHit, ContextStats
from .services.feedback._store import (
    SCORE_RANGE as FEEDBACK_SCORE_RANGE,
)
from .services.feedback._store import (
    FeedbackRecord,
    FeedbackStats,
    FeedbackStore,
    TrainingExample,
)
from .services.models._cpu import CpuAllotter, CpuSnapshot
from .services.models._loader import LoaderConfig, ModelLoader, SlotStats
from .services.models._memory import MemoryMonitor
from .services.models._pressure import PressureLevel, PressureThresholds
from .services.models._registry import AgentSpec, Registry, VirtualMember, VirtualSpec
from .services.models._tiers import MemoryEstimate, estimate_model_memory
from .services.observability._logging import configure_logging
from .services.observability._sanitize import sanitize_text
from .services.observability._tracefile import find_traces, read_traces
from .services.resilience._admission import AdmissionController
from .services.resilience._breaker import BreakerBoard, BreakerConfig
from .services.resilience._guardrails import GuardrailConfig, Guardrails
from .services.resilience._retry import Retries, RetryPolicy
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
from .tuning._data import load_examples
from .tuning._lora import TuneConfig, TuneReport, tune_agent

__version__ = "0.1.0"

__all__ = [
    "API_KEY_ENV",
    "CACHE_LEVELS",
    "DEFAULT_HTTP_HOST",
    "DEFAULT_HTTP_PORT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_ROUTING_METHOD",
    "DEFAULT_SHUTDOWN_GRACE_S",
    "FEEDBACK_FILE_ENV",
    "FEEDBACK_SCORE_RANGE",
    "SERVER_ENV",
    "TRACE_FILE_ENV",
    "AddResult",
    "AdmissionController",
    "AgentScore",
    "AgentSpec",
    "Answer",
    "AnswerCheck",
    "AnswerQuestion",
    "AnswerReport",
    "BreakerBoard",
    "BreakerConfig",
    "CacheConfig",
    "CacheSet",
    "CacheStats",
    "ChunkingConfig",
    "Citation",
    "Clock",
    "Comparison",
    "ConfigurationError",
    "ContextError",
    "ContextEval",
    "ContextHit",
    "ContextQuestion",
    "ContextSource",
    "ContextStats",
    "ContextStore",
    "ConvertedModel",
    "CpuAllotter",
    "CpuSnapshot",
    "EmbeddingError",
    "EmbeddingRouter",
    "EmbeddingService",
    "Engine",
    "EngineStats",
    "EvalProgress",
    "EvalReport",
    "EvaluationError",
    "FeedbackError",
    "FeedbackRecord",
    "FeedbackStats",
    "FeedbackStore",
    "GenerationParams",
    "GenerationStalled",
    "GuardrailConfig",
    "Guardrails",
    "InferenceError",
    "InsufficientMemory",
    "LabelledText",
    "LoadedModel",
    "Loader",
    "LoaderConfig",
    "ManualClock",
    "MemberResult",
    "MemoryEstimate",
    "MemoryMonitor",
    "Message",
    "ModelCache",
    "ModelError",
    "ModelFileError",
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
    "Reranker",
    "ResponseStream",
    "Result",
    "Retries",
    "RetryPolicy",
    "RouteExplanation",
    "Router",
    "RoutingDecision",
    "RuleRouter",
    "Session",
    "SessionStream",
    "SlotStats",
    "SystemClock",
    "Tally",
    "TokenUsage",
    "ToolCall",
    "TrainingExample",
    "TuneConfig",
    "TuneReport",
    "TuningError",
    "ValidationError",
    "VirtualMember",
    "VirtualSpec",
    "__version__",
    "caches_dir",
    "compare",
    "configure_logging",
    "contexts_dir",
    "default_cache_dir",
    "default_feedback_path",
    "default_trace_path",
    "estimate_model_memory",
    "evaluate_answers",
    "evaluate_context",
    "evaluate_router",
    "find_traces",
    "fit_thresholds",
    "load_answer_set",
    "load_examples",
    "load_labelled",
    "load_questions",
    "models_dir",
    "read_traces",
    "repl_history_path",
    "request_chart",
    "resolve_cache_dir",
    "sanitize_text",
    "tune_agent",
    "tuned_models_dir",
    "user_registry_path",
]
