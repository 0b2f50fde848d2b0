"""orion_fsm: serve local language models through an explicit, per-request async state machine.

    async with Engine() as engine:
        result = await engine.infer("What is the capital of France?")
        async for text in engine.stream("Tell me a story"):
            print(text, end="")
"""

from ._clock import Clock, ManualClock, SystemClock
from ._engine import Engine, ResponseStream
from ._exceptions import (
    ConfigurationError,
    InferenceError,
    InsufficientMemory,
    ModelError,
    ModelLoadError,
    OrionError,
    Overloaded,
    RegistryError,
    RequestFailed,
    RequestTimeout,
    ValidationError,
)
from ._types import GenerationParams, Message, PhaseTiming, Request, Result, TokenUsage
from .services.caches._cacheset import CacheConfig, CacheSet, CacheStats
from .services.models._loader import LoaderConfig
from .services.models._memory import MemoryMonitor
from .services.models._pressure import PressureLevel, PressureThresholds
from .services.models._registry import AgentSpec, Registry
from .services.observability._logging import configure_logging
from .services.resilience._breaker import BreakerBoard, BreakerConfig
from .services.resilience._guardrails import GuardrailConfig, Guardrails
from .services.routing._router import Router, RoutingDecision, RuleRouter

__version__ = "0.1.0"

__all__ = [
    "AgentSpec",
    "BreakerBoard",
    "BreakerConfig",
    "CacheConfig",
    "CacheSet",
    "CacheStats",
    "Clock",
    "ConfigurationError",
    "Engine",
    "GenerationParams",
    "GuardrailConfig",
    "Guardrails",
    "InferenceError",
    "InsufficientMemory",
    "LoaderConfig",
    "ManualClock",
    "MemoryMonitor",
    "Message",
    "ModelError",
    "ModelLoadError",
    "OrionError",
    "Overloaded",
    "PhaseTiming",
    "PressureLevel",
    "PressureThresholds",
    "Registry",
    "RegistryError",
    "Request",
    "RequestFailed",
    "RequestTimeout",
    "ResponseStream",
    "Result",
    "Router",
    "RoutingDecision",
    "RuleRouter",
    "SystemClock",
    "TokenUsage",
    "ValidationError",
    "__version__",
    "configure_logging",
]
