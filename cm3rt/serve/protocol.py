"""Request bodies of the OpenAI-compatible routes (OpenAI's field names, plus cm3rt's
sampling extensions) and OpenAI-shaped errors.

Bodies are validated strictly: a wrong type, an out-of-range value or an unknown field is a
400 whose message names the field. Sampling extensions left out stay "not given", so the
server resolves them exactly as ``cm3rt.generate`` does (cm3rt.api.resolve_request).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Sampling fields a request may set, beyond OpenAI's own: SamplingParams names.
SAMPLING_EXTENSIONS = ("seed", "guidance", "cfg_scale", "cfg_image_scale", "cd_alpha", "cd_k",
                       "uncond_docs", "temperature", "top_k", "top_p")
MAX_PROMPT_CHARS = 32_000  # as OpenAI's image prompts


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_ARGUMENT = re.compile(r"argument '(\w+)")
_FIELD = re.compile(r"SamplingParams\.(\w+)")


def user_error(exc: BaseException) -> APIError:
    """A 400 for a ValueError / TypeError / FileNotFoundError of cm3rt's validation; its
    message already names the argument, which also becomes ``param``."""
    text = str(exc)
    m = _ARGUMENT.search(text) or _FIELD.search(text)
    return APIError(400, text, param=m.group(1) if m else None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Sampling(_Strict):
    """cm3rt's sampling and retrieval extensions (None = not given)."""

    seed: int | None = Field(None, ge=0)
    guidance: str | None = None
    cfg_scale: float | None = None
    cfg_image_scale: float | None = None
    cd_alpha: float | None = None
    cd_k: int | None = None
    uncond_docs: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    k_docs: int | None = Field(None, ge=0)
    max_doc_score: float | None = Field(None, ge=-1, le=1)  # null: the rule off

    def given(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SAMPLING_EXTENSIONS if getattr(self, k) is not None}

    def retrieval(self) -> dict[str, Any]:
        """k_docs and, only when the body has the field, max_doc_score (absent: the model's
        default; null: the rule off) for cm3rt.api.resolve_request."""
        out: dict[str, Any] = {"k_docs": self.k_docs}
        if "max_doc_score" in self.model_fields_set:
            out["max_doc_score"] = self.max_doc_score
        return out


class ImageGenerationRequest(Sampling):
    """``POST /v1/images/generations``."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: Literal["b64_json"] | None = None
    user: str | None = None
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)


class ImageEditForm(ImageGenerationRequest):
    """``POST /v1/images/edits`` (multipart: the form's text fields, coerced from strings;
    the image comes as a file part)."""

    model_config = ConfigDict(extra="forbid", strict=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(Sampling):
    """``POST /v1/chat/completions`` (OpenAI's vision message format)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=10)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) of pydantic's first error, naming the field."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}", None
    field = ".".join(loc) if loc else None
    msg = err.get("msg", "invalid value")
    return (f"'{field}': {msg}" if field else msg), field
