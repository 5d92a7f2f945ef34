"""bridge/page.py: the try-it page and its assets over ASGI (the browser test: tests/e2e)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.page import PageApp, load_assets

REPO = Path(__file__).parent.parent.parent
STATIC = REPO / "bridge" / "static"


async def _fallback(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 418, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


def _client() -> httpx.AsyncClient:
    app: Any = PageApp(_fallback)  # httpx types scope as MutableMapping, the bridge as dict
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://bridge")


async def test_index_is_html_revalidated_and_locked_down() -> None:
    async with _client() as client:
        response = await client.get("/?token=abc")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "<title>" in response.text
        again = await client.get("/", headers={"if-none-match": response.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert (await client.get("/index.html")).content == response.content
        head = await client.head("/")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(response.content))
        post = await client.post("/")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


async def test_assets_are_versioned_by_content_and_cached_only_at_that_version() -> None:
    async with _client() as client:
        page = (await client.get("/")).text
        refs = dict(re.findall(r'"/static/([\w.-]+)\?v=(\w+)"', page))
        assert set(refs) == {"app.css", "app.js", "socket.io.min.js"}
        for name, version in refs.items():
            body = (STATIC / name).read_bytes()
            assert version == hashlib.sha256(body).hexdigest()[:12]
            pinned = await client.get(f"/static/{name}?v={version}")
            assert pinned.status_code == 200 and pinned.content == body
            assert pinned.headers["cache-control"] == "public, max-age=31536000, immutable"
            stale = await client.get(f"/static/{name}?v=old")
            assert stale.headers["cache-control"] == "no-cache"
        js = await client.get("/static/app.js")
        assert js.headers["content-type"] == "text/javascript; charset=utf-8"
        css = await client.get("/static/app.css")
        assert css.headers["content-type"] == "text/css; charset=utf-8"


@pytest.mark.parametrize(
    "path",
    [
        "/static/../page.py",
        "/static/..%2fpage.py",
        "/static/%2e%2e/app.py",
        "/static//etc/passwd",
        "/static/",
        "/static/README",
        "/static/index.html",
        "/static/admin.html",
        "/static/nope.js",
        "/static/app.js/",
    ],
)
async def test_nothing_outside_the_known_assets_is_served(path: str) -> None:
    async with _client() as client:
        response = await client.get(path)
    # Either a plain 404, or (a path the client normalised out of /static/) the next app.
    assert response.status_code in (404, 418)
    assert b"import" not in response.content


async def test_other_paths_reach_the_wrapped_app() -> None:
    async with _client() as client:
        response = await client.get("/healthz")
        assert (response.status_code, response.text) == (418, "/healthz")
        for path in ("/admin/", "/admin/flags", "/admin/rollout", "/admin.html", "/admin/x"):
            assert (await client.get(path)).status_code == 418, path  # the API's, not a page


async def test_admin_page_is_served_at_admin_with_versioned_assets_and_the_same_headers() -> None:
    async with _client() as client:
        response = await client.get("/admin")
        index = await client.get("/")
        assert response.status_code == 200 and response.content != index.content
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        for header in ("content-security-policy", "x-content-type-options", "referrer-policy"):
            assert response.headers[header] == index.headers[header]
        refs = dict(re.findall(r'"/static/([\w.-]+)\?v=(\w+)"', response.text))
        assert set(refs) == {"app.css", "admin.css", "admin.js"}
        for name, version in refs.items():
            assert version == hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:12]
        again = await client.get("/admin", headers={"if-none-match": response.headers["etag"]})
        assert again.status_code == 304
        assert (await client.post("/admin")).status_code == 405


def test_only_known_files_are_loaded_and_the_page_refs_get_versions() -> None:
    assets = load_assets({"index.html": b'<script src="/static/a.js"></script>', "a.js": b"1"})
    version = hashlib.sha256(b"1").hexdigest()[:12]
    assert assets["index.html"].body == f'<script src="/static/a.js?v={version}"></script>'.encode()
    assert set(load_assets()) == {
        "index.html", "app.js", "app.css", "socket.io.min.js", "admin.html", "admin.js",
        "admin.css",
    }  # fmt: skip


def test_vendored_socket_io_client_is_the_pinned_version() -> None:
    lock = json.loads((REPO / "tests" / "e2e" / "package-lock.json").read_text())
    version = lock["packages"]["node_modules/socket.io-client"]["version"]
    vendored = (STATIC / "socket.io.min.js").read_bytes()
    assert vendored.startswith(f"/*!\n * Socket.IO v{version}\n".encode())
    readme = (STATIC / "README").read_text()
    assert f"socket.io-client {version}" in readme
    assert hashlib.sha256(vendored).hexdigest() in readme
    installed = REPO / "tests" / "e2e" / "node_modules" / "socket.io-client" / "dist"
    if (installed / "socket.io.min.js").exists():
        assert (installed / "socket.io.min.js").read_bytes() == vendored
