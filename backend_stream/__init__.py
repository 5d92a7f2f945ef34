"""SSE chat backend: resumable, idempotent generations buffered in Redis (issue 2)."""

from backend_stream.app import create_app
from backend_stream.settings import Settings

__all__ = ["Settings", "create_app"]
