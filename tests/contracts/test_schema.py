from __future__ import annotations

import json

from contracts import schema


def test_committed_schemas_match_the_models() -> None:
    """Fails when a model changed and ``python -m contracts.schema`` was not re-run."""
    assert schema.drift() == []


def test_asyncapi_lists_every_socketio_and_sse_event() -> None:
    doc = json.loads((schema.SCHEMA_DIR / "asyncapi.json").read_text())
    channels = set(doc["channels"])
    for name, _, _ in schema.SOCKETIO_MESSAGES:
        assert f"socketio/{name}" in channels
    for name, _ in schema.SSE_MESSAGES:
        assert f"sse/{name}" in channels
    refs = json.dumps(doc["channels"])
    for model in schema.all_models():
        if f'/{model.__name__}"' in refs:
            assert model.__name__ in doc["components"]["schemas"]


def test_drift_is_detected(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name, text in schema.rendered().items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(schema, "SCHEMA_DIR", tmp_path)
    assert schema.drift() == []
    (tmp_path / "SendMessage.json").write_text("{}\n")
    assert schema.drift() == ["SendMessage.json"]
