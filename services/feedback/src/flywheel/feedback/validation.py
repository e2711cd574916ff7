"""Input checks of the feedback domain: each failure names the field it is about."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flywheel.contracts.common.v1.common_pb2 import Prompt
from flywheel.core.errors import FieldError, InvalidArgument

SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
TASK = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?$")
MAX_OUTPUT_CHARS = 200_000
MAX_PROMPT_CHARS = 200_000
MAX_COMMENT_CHARS = 10_000
MAX_ID_CHARS = 200
MAX_METADATA_BYTES = 16_384
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}


class Checks:
    """Collects field errors, then raises them all at once."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def fail(self, field: str, message: str) -> None:
        """Record one bad field."""
        self.errors.append(FieldError(field, message))

    def require(self, ok: bool, field: str, message: str) -> None:
        """Record ``message`` for ``field`` unless ``ok``."""
        if not ok:
            self.fail(field, message)

    def text(self, value: str, field: str, *, max_chars: int, required: bool = True) -> None:
        """A string that must be present (if ``required``) and not too long."""
        if required and not value.strip():
            self.fail(field, "must not be empty")
        elif len(value) > max_chars:
            self.fail(field, f"must be at most {max_chars} characters (got {len(value)})")

    def slug(self, value: str, field: str, pattern: re.Pattern[str] = SLUG) -> None:
        """A lowercase identifier."""
        if not pattern.match(value):
            self.fail(field, "must be 1-63 lowercase letters, digits or '-', not at the ends")

    def metadata(self, data: dict[str, Any], field: str) -> None:
        """Free-form metadata, bounded in size."""
        size = len(json.dumps(data))
        if size > MAX_METADATA_BYTES:
            self.fail(field, f"must be at most {MAX_METADATA_BYTES} bytes as JSON (got {size})")

    def prompt(self, prompt: Prompt, field: str) -> None:
        """A text prompt or a list of chat messages with known roles."""
        kind = prompt.WhichOneof("kind")
        if kind is None:
            self.fail(field, "must be either text or messages")
        elif kind == "text":
            self.text(prompt.text, f"{field}.text", max_chars=MAX_PROMPT_CHARS)
        else:
            messages = prompt.messages.messages
            if not messages:
                self.fail(f"{field}.messages", "must hold at least one message")
            total = 0
            for i, message in enumerate(messages):
                if message.role not in CHAT_ROLES:
                    self.fail(
                        f"{field}.messages[{i}].role",
                        f"must be one of {', '.join(sorted(CHAT_ROLES))}",
                    )
                total += len(message.content)
            if total > MAX_PROMPT_CHARS:
                self.fail(f"{field}.messages", f"must be at most {MAX_PROMPT_CHARS} characters")

    def done(self) -> None:
        """Raise every recorded error as one InvalidArgument."""
        if self.errors:
            raise InvalidArgument(self.errors)


def prompt_hash(prompt: Prompt) -> str:
    """sha256 of the canonical prompt: equal prompts, equal hashes, whatever the client."""
    if prompt.WhichOneof("kind") == "text":
        canonical: Any = {"text": prompt.text}
    else:
        canonical = {"messages": [[m.role, m.content, m.name] for m in prompt.messages.messages]}
    data = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()
