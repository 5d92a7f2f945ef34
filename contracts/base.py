"""Shared pieces of every payload model: camelCase on the wire, unknown fields ignored."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel

from contracts.errors import ContractError, ErrorCode

# Ids travel into Redis keys and log lines, so they are restricted to a safe alphabet.
ID_PATTERN = r"^[A-Za-z0-9_.:@\-]+$"
MAX_ID_LENGTH = 128

Id = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN),
]
Text = Annotated[str, StringConstraints(strict=True)]
Seq = Annotated[int, Field(strict=True, ge=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]

# A default for the longest user message; both services make it configurable.
DEFAULT_MAX_CONTENT_CHARS = 4000


class WireModel(BaseModel):
    """Base of every payload: camelCase aliases, snake_case attributes, extra fields ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready camelCase dict that goes on a wire."""
        return self.model_dump(mode="json", by_alias=True)

    def wire_json(self) -> str:
        return self.model_dump_json(by_alias=True)


M = TypeVar("M", bound=WireModel)


def _describe(exc: ValidationError) -> str:
    # Built from locations and pydantic's messages only: never echoes the input (it may be content).
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse(model: type[M], data: object) -> M:
    """Validate ``data`` (a decoded JSON value) as ``model`` or raise ``ContractError``."""
    if not isinstance(data, dict):
        raise ContractError(ErrorCode.INVALID_PAYLOAD, "payload must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, _describe(exc)) from None


def parse_json(model: type[M], raw: str | bytes) -> M:
    """Validate a JSON document as ``model`` or raise ``ContractError``."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ContractError(ErrorCode.INVALID_PAYLOAD, _describe(exc)) from None


def check_content(content: str, max_chars: int) -> None:
    """Raise ``EMPTY_MESSAGE`` / ``MESSAGE_TOO_LONG`` for content the model must never see."""
    if not content.strip():
        raise ContractError(ErrorCode.EMPTY_MESSAGE, "content is empty")
    if len(content) > max_chars:
        raise ContractError(
            ErrorCode.MESSAGE_TOO_LONG, f"content is longer than {max_chars} characters"
        )


def utc_now_iso() -> str:
    """``createdAt`` format: ISO 8601, UTC, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
