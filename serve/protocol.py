"""OpenAI-compatible request schemas (the subset tsugiki serves) and response builders.

Unknown fields are ignored, as OpenAI-compatible servers do; wrong types and out-of-range values are refused
with a 400 that names the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tsugiki.errors import InvalidRequestError

SQLITE_MAX_INT = 2**63 - 1  # the registry's integers are SQLite's 64-bit ones


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Req):
    include_usage: bool = False


class _Sampling(_Req):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what a torch generator accepts
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def stop_list(self) -> tuple[str, ...]:
        return tuple(self.stop or ())  # type: ignore[arg-type]

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported; the prompt you sent is the text before the completion")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if all(isinstance(x, str) for x in v):
                if len(v) != 1:
                    raise ValueError("batched prompts are not supported; send one prompt per request")
                return v[0]
        return v


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise InvalidRequestError("only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _nonempty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must hold at least one message")
        return v

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class LoadAdapterRequest(_Req):
    """tsugiki's ``POST /v1/adapters`` body."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


class VLLMLoadRequest(_Req):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class VLLMUnloadRequest(_Req):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class FeedbackRequest(_Req):
    """``POST /v1/feedback``: a judgement of one response, named by the ``x-request-id`` it was served with."""

    request_id: str = Field(min_length=1, max_length=128)
    label: str | None = Field(default=None, min_length=1, max_length=512)
    preferred: str | None = Field(default=None, min_length=1, max_length=20_000)
    score: float | None = Field(default=None, allow_inf_nan=False)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if self.label is None and self.preferred is None and self.score is None:
            raise ValueError("feedback needs at least one of label, preferred or score")
        return self


class RegisterVersionRequest(_Req):
    """``POST /v1/registry/versions``: register an adapter directory as a candidate version of ``name``."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    data_path: str | None = Field(default=None, description="Its training data (JSON Lines), for refreshes.")
    tune: dict[str, Any] | None = Field(default=None, description="TuneConfig fields refreshes start from.")


class RolloutStartRequest(_Req):
    candidate: str = Field(min_length=1, description="The version key to roll out, e.g. support@v2.")


class CaptureRequest(_Req):
    rate: float = Field(ge=0, le=1, description="Share of the alias's requests captured.")
    retention: int = Field(ge=0, le=SQLITE_MAX_INT, description="Captures kept at most (oldest dropped).")


class RefreshRequest(_Req):
    reason: str = Field(default="requested by an operator", max_length=500)
    force: bool = Field(default=False, description="Ignore the cooldown and refresh.enabled.")
