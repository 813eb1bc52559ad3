"""The project's one exception hierarchy.

Every error a user can cause maps to an HTTP status and the OpenAI error shape
(``{"error": {"message", "type", "param", "code"}}``); third-party errors are
mapped at the boundary with ``raise ... from e``.
"""

from __future__ import annotations

from typing import Any


class TsugikiError(Exception):
    """Base class. ``status`` is the HTTP status a gateway answers with."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict[str, Any]:
        """A plain, picklable description (crosses Ray process boundaries without custom classes)."""
        return {"kind": type(self).__name__, "message": self.message, "param": self.param, "code": self.code}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TsugikiError:
        cls = _BY_NAME.get(str(d.get("kind")), TsugikiError)
        return cls(str(d.get("message")), param=d.get("param"), code=d.get("code"))


class InvalidRequestError(TsugikiError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(TsugikiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(TsugikiError):
    status = 403
    type = "permission_error"


class NotFoundError(TsugikiError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class AdapterError(InvalidRequestError):
    """A LoRA adapter artifact is missing, corrupt, unsafe or does not fit the base model."""

    code = "invalid_adapter"


class ConfigError(TsugikiError):
    """Bad configuration: raised at start-up, reported by the CLI with the fix."""

    status = 500
    type = "configuration_error"


class OverloadedError(TsugikiError):
    status = 503
    type = "overloaded_error"
    code = "overloaded"


class EngineError(TsugikiError):
    status = 500
    type = "internal_error"


class ConflictError(InvalidRequestError):
    """The request conflicts with the registry's current state: an illegal lifecycle transition, a retired version
    in a route, a second active rollout for an alias."""

    status = 409
    code = "registry_conflict"


class ArtifactStoreError(TsugikiError):
    """The artifact backend failed (unreachable, access denied, out of space): not the caller's fault."""

    status = 502
    type = "internal_error"
    code = "artifact_store_error"


_BY_NAME: dict[str, type[TsugikiError]] = {
    c.__name__: c
    for c in (
        TsugikiError,
        InvalidRequestError,
        ContextLengthError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ModelNotFoundError,
        AdapterError,
        ConfigError,
        OverloadedError,
        EngineError,
        ConflictError,
        ArtifactStoreError,
    )
}
