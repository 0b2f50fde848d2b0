"""orion_fsm: serve local language models through an explicit, per-request async state machine.

    async with Engine() as engine:
        result = await engine.infer("What is the capital of France?")
        async for text in engine.stream("Tell me a story"):
            print(text, end="")
"""

from ._engine import Engine, ResponseStream
from ._exceptions import (
    InferenceError,
    ModelError,
    ModelLoadError,
    OrionError,
    RegistryError,
    RequestFailed,
    ValidationError,
)
from ._types import GenerationParams, Message, PhaseTiming, Request, Result, TokenUsage
from .services._admission import Overloaded, RequestTimeout
from .services._breaker import BreakerBoard, BreakerConfig
from .services._cache import CacheConfig, CacheSet, CacheStats
from .services._clock import Clock, ManualClock, SystemClock
from .services._guardrails import GuardrailConfig, Guardrails
from .services._loader import InsufficientMemory, LoaderConfig
from .services._logging import configure_logging
from .services._memory import MemoryMonitor, PressureLevel, PressureThresholds
from .services._registry import AgentSpec, Registry
from .services._router import Router, RoutingDecision, RuleRouter

__version__ = "0.1.0"

__all__ = [
    "AgentSpec",
    "BreakerBoard",
    "BreakerConfig",
    "CacheConfig",
    "CacheSet",
    "CacheStats",
    "Clock",
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
