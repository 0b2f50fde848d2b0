"""The one exception hierarchy of orion_fsm, rooted at OrionError.

Every error a user can cause says what was wrong and how to fix it; errors raised while
serving a request carry its id.
"""

from __future__ import annotations


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


class ModelError(OrionError):
    """A model could not be converted, loaded or run."""


class ModelLoadError(ModelError):
    """The model file is missing, unreadable, or the runtime refused it."""


class InferenceError(ModelError):
    """Generation failed after the model was loaded."""


class RequestFailed(OrionError):
    """A request ended in the `error` state; `reason` says why (validation, exhausted, ...)."""

    def __init__(
        self, message: str, *, reason: str, request_id: str | None = None, result: object = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.reason = reason
        self.result = result
