"""The bridge: a Socket.IO server relaying the backend's SSE streams to chat rooms."""

from bridge.app import Bridge
from bridge.errors import BridgeError, UpstreamError
from bridge.relay import EventSink, Relay, RelayJob
from bridge.settings import Settings
from bridge.upstream import Upstream, UpstreamStream

__all__ = [
    "Bridge",
    "BridgeError",
    "EventSink",
    "Relay",
    "RelayJob",
    "Settings",
    "Upstream",
    "UpstreamError",
    "UpstreamStream",
]
