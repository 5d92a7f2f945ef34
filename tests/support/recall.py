"""What the scripted model's ``[[recall=1]]`` answers after a prompt holding ``answers``
(backend_stream/providers/scripted.py), computed here independently, for the room-order tests."""

from __future__ import annotations

import hashlib


def recalled(answers: list[str]) -> str:
    digest = hashlib.sha256("\n".join(answers).encode()).hexdigest()[:12]
    return f"seen {len(answers)} {digest}"
