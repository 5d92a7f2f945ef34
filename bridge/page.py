"""The try-it page (``GET /``), the operator page (``GET /admin``) and their assets under
``/static/``, in front of the probe app (everything under ``/admin/`` stays the JSON API).

``bridge/static/`` is read once at start-up into memory (a few tens of kB) and only those files
are served, looked up by exact name: no path from the request ever reaches the file system, so
traversal (``/static/../app.py``, encoded or not) is a plain 404. The page's asset URLs carry a
content hash (``/static/app.js?v=3f2a...``); a request with the current hash is cacheable for a
year (``immutable``), anything else, the page itself included, revalidates (``no-cache`` with an
``ETag``, ``304`` on a match).

``socket.io.min.js`` is the official browser client vendored verbatim (license banner kept):
``dist/socket.io.min.js`` of the npm package ``socket.io-client`` 4.8.4, the version pinned in
``tests/e2e/package-lock.json`` (see ``bridge/static/README``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

STATIC_PREFIX = "/static/"
INDEX = "index.html"
ADMIN = "admin.html"
PAGE_PATHS = ("/", "/index.html")
ADMIN_PATH = "/admin"
PAGES = (INDEX, ADMIN)  # served at their paths only, with their asset URLs versioned
ASSET_MAX_AGE_S = 31_536_000
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
# Same-origin only: the page talks to the bridge that served it ('self' covers ws:/wss: of the
# same host); no inline script, no external asset. The token may sit in the page's URL, hence
# no-referrer.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str
    version: str


def _asset(name: str, body: bytes) -> Asset:
    digest = hashlib.sha256(body).hexdigest()
    suffix = name[name.rfind(".") :] if "." in name else ""
    content_type = CONTENT_TYPES.get(suffix, "application/octet-stream")
    return Asset(body, content_type, etag=f'"{digest[:32]}"', version=digest[:12])


def load_assets(files: Mapping[str, bytes] | None = None) -> dict[str, Asset]:
    """Every servable file by name (``bridge/static`` unless ``files`` is given); the page's
    references to the other assets get their content hash appended."""
    if files is None:
        root = resources.files("bridge") / "static"
        files = {
            entry.name: entry.read_bytes()
            for entry in root.iterdir()
            if entry.is_file() and not entry.name.startswith(".") and entry.name != "README"
        }
    assets = {name: _asset(name, body) for name, body in files.items() if name not in PAGES}
    pages = {}
    for page_name in PAGES:
        if page_name not in files:
            continue
        page = files[page_name].decode()
        for name, asset in assets.items():
            page = page.replace(
                f'"{STATIC_PREFIX}{name}"', f'"{STATIC_PREFIX}{name}?v={asset.version}"'
            )
        pages[page_name] = _asset(page_name, page.encode())
    return {**assets, **pages}


class PageApp:
    """ASGI: serve the page and its assets, hand every other request to ``other``."""

    def __init__(self, other: App, assets: Mapping[str, Asset] | None = None) -> None:
        self._other = other
        self._assets = dict(load_assets() if assets is None else assets)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        path: str = scope.get("path", "")
        immutable = False
        if path in PAGE_PATHS:
            asset = self._assets.get(INDEX)
        elif path == ADMIN_PATH:
            asset = self._assets.get(ADMIN)
        elif path.startswith(STATIC_PREFIX):
            name = path[len(STATIC_PREFIX) :]
            asset = None if name in PAGES else self._assets.get(name)
            immutable = asset is not None and _query_version(scope) == asset.version
        else:
            await self._other(scope, receive, send)
            return
        if asset is None:
            await _respond(send, 404, b"not found\n", [(b"content-type", b"text/plain")])
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            headers = [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain")]
            await _respond(send, 405, b"method not allowed\n", headers)
            return
        cache = (
            f"public, max-age={ASSET_MAX_AGE_S}, immutable".encode() if immutable else b"no-cache"
        )
        headers = [
            (b"content-type", asset.content_type.encode()),
            (b"cache-control", cache),
            (b"etag", asset.etag.encode()),
            *SECURITY_HEADERS,
        ]
        if asset.etag in _if_none_match(scope):
            await _respond(send, 304, b"", headers)
            return
        headers.append((b"content-length", str(len(asset.body)).encode()))
        await _respond(send, 200, b"" if method == "HEAD" else asset.body, headers)


def _query_version(scope: Scope) -> str | None:
    query: bytes = scope.get("query_string", b"")
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == b"v":
            return value.decode("latin-1")
    return None


def _if_none_match(scope: Scope) -> list[str]:
    for key, value in scope.get("headers", []):
        if key == b"if-none-match":
            return [tag.strip().removeprefix("W/") for tag in value.decode("latin-1").split(",")]
    return []


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
