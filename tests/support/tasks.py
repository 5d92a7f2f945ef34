"""What a socket saw of one batch task: shared by the bridge's and the integration tests."""

from __future__ import annotations

from typing import Any

from tests.bridge.harness import Client


def task_of(client: Client, event: str, task_id: str) -> list[Any]:
    """``event``s of one task on one socket (``new_message`` by its requestId)."""
    found = []
    for name, data in client.events:
        if name != event or not isinstance(data, dict):
            continue
        rid = data.get("taskId") or (data.get("message") or {}).get("requestId")
        if rid == task_id:
            found.append(data)
    return found


def roles(client: Client, task_id: str) -> list[str]:
    return [m["message"]["role"] for m in task_of(client, "new_message", task_id)]
