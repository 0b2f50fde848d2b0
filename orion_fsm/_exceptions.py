"""The one exception hierarchy of orion_fsm, rooted at OrionError; every service raises from here.

    OrionError
    ├── ConfigurationError      a setting got a value it cannot take (also a ValueError)
    ├── RegistryError           models.json is malformed or names what does not exist
    ├── ValidationError         a request was rejected before reaching any model
    ├── GrammarError            an output format cannot be compiled (also a ValueError)
    ├── ModelError
    │   ├── ModelLoadError      the model file is missing, unreadable or refused
    │   │   └── InsufficientMemory   refused before loading: it would not fit
    │   ├── ModelFileError      quantize/merge/shard refused an input or could not write
    │   └── InferenceError      generation failed after the model was loaded
    │       ├── OutputRejected  the finished output does not fit the requested format
    │       └── GenerationStalled    no token came within the agent's stall_s
    ├── EmbeddingError          the embedding model failed, timed out or is not running
    │   └── EmbeddingUnavailable     it cannot be loaded at all
    ├── CacheError              a cache was asked for what it does not have
    ├── ContextError            a context store refused an input or does not have a document
    ├── EvaluationError         an answer set or an evaluation's arguments are malformed
    ├── FeedbackError           a rating names no recent request, or is out of range
    ├── TuningError             fine-tuning refused its data, agent or output
    ├── Overloaded              the admission queue is full           } the engine's own
    ├── RequestTimeout          a request ran past its deadline       } signals: a caller
    └── RequestFailed           a request ended in the `error` state    gets RequestFailed

Every error a user can cause says what was wrong and how to fix it; errors raised while
serving a request carry its id.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "ConfigurationError",
    "ContextError",
    "EmbeddingError",
    "EmbeddingUnavailable",
    "EvaluationError",
    "FeedbackError",
    "GenerationStalled",
    "GrammarError",
    "InferenceError",
    "InsufficientMemory",
    "ModelError",
    "ModelFileError",
    "ModelLoadError",
    "OrionError",
    "OutputRejected",
    "Overloaded",
    "RegistryError",
    "RequestFailed",
    "RequestTimeout",
    "TuningError",
    "ValidationError",
]


class OrionError(Exception):
    """Base of every error orion_fsm raises on purpose."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request {self.request_id})"
        return self.message


class ConfigurationError(OrionError, ValueError):
    """A setting was given a value it cannot take: `setting` names it, `value` is what it got.

    Also a ValueError, on purpose: a bad argument value is what ValueError means, and most of
    these settings raised a plain ValueError before they joined this tree, so code that
    catches ValueError around a config object keeps working. Raised when the object is built,
    never mid-request.
    """

    def __init__(self, setting: str, value: object, expected: str) -> None:
        super().__init__(f"{setting} must be {expected}, got {value!r}")
        self.setting = setting
        self.value = value


class RegistryError(OrionError):
    """The model registry (models.json) is malformed or names something that does not exist."""

    def __init__(self, message: str, *, json_path: str = "$") -> None:
        super().__init__(f"models registry, at {json_path}: {message}")
        self.json_path = json_path


class ValidationError(OrionError):
    """A request or its generation parameters were rejected before reaching any model."""

    def __init__(self, message: str, *, field: str, request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.field = field


class GrammarError(OrionError, ValueError):
    """A JSON schema, regex or grammar the constrained decoder cannot compile."""


class ModelError(OrionError):
    """A model could not be converted, loaded or run."""


class ModelLoadError(ModelError):
    """The model file is missing, unreadable, or the runtime refused it."""


class ModelFileError(ModelError):
    """A model file operation (quantize, merge, shard) refused its input or could not write
    its output: a missing or corrupt file, mismatched architectures, an unknown type."""


class InsufficientMemory(ModelLoadError):
    """A model was refused before loading: it does not fit, or memory pressure is critical.

    Raised instead of letting the process be OOM-killed; the request machine answers it like
    any load failure, by falling back to the next (smaller) agent.
    """

    def __init__(self, message: str, *, needed_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes


class InferenceError(ModelError):
    """Generation failed after the model was loaded."""


class OutputRejected(InferenceError):
    """The finished output is not what the requested format asks for (cut off, invalid)."""


class GenerationStalled(InferenceError):
    """No token came within the stall limit: the generation was abandoned (its slot is
    quarantined, as a runtime call cannot be interrupted) and the request falls back."""

    def __init__(self, limit_s: float, *, request_id: str | None = None) -> None:
        super().__init__(
            f"stalled: no token for {limit_s:g} s; the generation was abandoned and its slot "
            "quarantined (raise the agent's stall_s if the model is just slow)",
            request_id=request_id)
        self.limit_s = limit_s


class EmbeddingError(OrionError):
    """The embedding model failed, timed out, or the service is not running."""


class EmbeddingUnavailable(EmbeddingError):
    """The embedding model cannot be loaded (package or model files missing, runtime absent)."""


class CacheError(OrionError):
    """A cache was asked for something it does not have (an unknown level, a bad record)."""


class ContextError(OrionError):
    """A context store refused a document, or was asked about one it does not hold."""


class FeedbackError(OrionError):
    """A rating was refused (unknown or too old request, score out of range, empty
    correction: `field` names it) or the feedback store cannot be read or written (`field`
    None)."""

    def __init__(self, message: str, *, field: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.field = field


class TuningError(OrionError):
    """`models tune` refused its input (unknown agent, empty or malformed data, too few
    examples, a model it cannot read) or could not write its output."""


class EvaluationError(OrionError):
    """An answer set (eval/answers.jsonl format) or an evaluation's arguments are malformed."""


class Overloaded(OrionError):
    """Too many requests are already waiting: this one was refused without waiting."""

    def __init__(self, queued: int, limit: int, *, request_id: str | None = None) -> None:
        super().__init__(f"{queued} requests queued (limit {limit}): retry later or raise "
                         "max_queue", request_id=request_id)
        self.queued = queued
        self.limit = limit


class RequestTimeout(OrionError):
    """A request ran past its deadline (`timeout_s`)."""

    def __init__(self, timeout_s: float, phase: str | None = None, *,
                 request_id: str | None = None) -> None:
        where = f" (in {phase})" if phase else ""
        super().__init__(f"the request took longer than its timeout of {timeout_s:g} s{where}: "
                         "raise timeout_s or ask for fewer tokens", request_id=request_id)
        self.timeout_s = timeout_s
        self.phase = phase


class RequestFailed(OrionError):
    """A request ended in the `error` state: what `infer` and `stream` raise. `reason` says why
    (invalid, overloaded, timeout, cancelled, exhausted, inference_failed, internal) and
    `result` holds the request's `Result`. Overloaded and RequestTimeout are how admission and
    the deadline tell the engine; they reach a caller as this, with that reason."""

    def __init__(
        self, message: str, *, reason: str, request_id: str | None = None, result: object = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.reason = reason
        self.result = result
        # Set when every circuit breaker of the chain refused (reason exhausted): seconds
        # until the first lets a probe through. HTTP: 503 with Retry-After.
        self.retry_after_s = retry_after_s
