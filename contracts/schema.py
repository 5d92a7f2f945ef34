"""JSON Schema and AsyncAPI export of the contract models.

``python -m contracts.schema`` rewrites ``contracts/schemas/``; ``--check`` exits 1 when the
committed files differ from what the models produce (the drift test runs the same comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path as FsPath
from typing import Any

from contracts import admin, backend, events
from contracts.base import WireModel

SCHEMA_DIR = FsPath(__file__).parent / "schemas"

# Socket.IO events: (event name, direction, payload model)
SOCKETIO_MESSAGES: list[tuple[str, str, type[WireModel]]] = [
    ("join_room", "client->bridge", events.JoinRoom),
    ("leave_room", "client->bridge", events.LeaveRoom),
    ("send_message", "client->bridge", events.SendMessage),
    ("cancel_message", "client->bridge", events.CancelMessage),
    ("client_timing", "client->bridge", events.ClientTiming),
    ("post_message", "client->bridge", events.PostMessage),
    ("add_member", "client->bridge", events.ChangeMember),
    ("remove_member", "client->bridge", events.ChangeMember),
    ("new_message", "bridge->client", events.NewMessage),
    ("ai_message_start", "bridge->client", events.AiMessageStart),
    ("ai_message_chunk", "bridge->client", events.AiMessageChunk),
    ("ai_message_end", "bridge->client", events.AiMessageEnd),
    ("ai_message_error", "bridge->client", events.AiMessageError),
    ("message_ack", "bridge->client", events.MessageAck),
    ("session_expired", "bridge->client", events.SessionExpired),
    ("room_event", "bridge->client", events.RoomEvent),
    ("task_done", "bridge->client", events.TaskDone),
]

ACK_MODELS: list[type[WireModel]] = [
    events.OkAck,
    events.ErrorAck,
    events.JoinRoomAck,
    events.MembersAck,
    events.PostAck,
    events.SendAccepted,
    events.SendRejected,
    events.ConnectErrorData,
]

SSE_MESSAGES: list[tuple[str, type[WireModel]]] = [
    ("start", backend.StreamStart),
    ("chunk", backend.StreamChunk),
    ("end", backend.StreamEnd),
    ("error", backend.StreamError),
]

HTTP_MODELS: list[type[WireModel]] = [
    backend.ChatRequest,
    backend.CompleteResponse,
    backend.CancelResponse,
    backend.ErrorBody,
    backend.HistoryResponse,
    backend.TaskAccepted,
    backend.TaskStatus,
    backend.TaskOutcome,
    backend.UsageResponse,
    # the bridge's operator API (CONTRACT.md section 4)
    admin.FlagsPatch,
    admin.FlagsView,
    admin.RolloutStart,
    admin.Transition,
    admin.RolloutView,
    admin.AuditEntry,
]


def all_models() -> list[type[WireModel]]:
    seen: dict[str, type[WireModel]] = {}
    for model in (
        [m for _, _, m in SOCKETIO_MESSAGES]
        + ACK_MODELS
        + [m for _, m in SSE_MESSAGES]
        + HTTP_MODELS
    ):
        seen[model.__name__] = model
    return [seen[name] for name in sorted(seen)]


def json_schema(model: type[WireModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, mode="serialization")


def _ref(model: type[WireModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def asyncapi() -> dict[str, Any]:
    """An AsyncAPI 2.6 document for the Socket.IO events and the backend's SSE events."""
    channels: dict[str, Any] = {}
    for name, direction, model in SOCKETIO_MESSAGES:
        op = "publish" if direction == "client->bridge" else "subscribe"
        channels[f"socketio/{name}"] = {
            "description": f"Socket.IO event `{name}` ({direction}), namespace `/`",
            op: {"message": {"name": name, "payload": _ref(model)}},
        }
    for name, model in SSE_MESSAGES:
        channels[f"sse/{name}"] = {
            "description": f"SSE `event: {name}` of POST /chat/messages/stream",
            "subscribe": {"message": {"name": name, "payload": _ref(model)}},
        }
    schemas: dict[str, Any] = {}
    for model in all_models():
        schema = json_schema(model)
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas[def_name] = definition
        schemas[model.__name__] = schema
    text = json.dumps(schemas).replace("#/$defs/", "#/components/schemas/")
    return {
        "asyncapi": "2.6.0",
        "info": {"title": "chat-bridge wire contract", "version": "1.0.0"},
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {"schemas": json.loads(text)},
    }


def rendered() -> dict[str, str]:
    """File name -> exact file text of everything under ``schemas/``."""
    files = {
        f"{model.__name__}.json": json.dumps(json_schema(model), indent=2, sort_keys=True) + "\n"
        for model in all_models()
    }
    files["asyncapi.json"] = json.dumps(asyncapi(), indent=2, sort_keys=True) + "\n"
    return files


def drift() -> list[str]:
    """Names of files that are missing, stale or unexpected under ``schemas/``."""
    want = rendered()
    have = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
    return sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contracts.schema")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files drifted")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for name in stale:
            print(f"schema drift: {name}", file=sys.stderr)
        return 1 if stale else 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for old in SCHEMA_DIR.glob("*.json"):
        old.unlink()
    for name, text in rendered().items():
        (SCHEMA_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
