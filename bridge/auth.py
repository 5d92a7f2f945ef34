"""Handshake authentication (CONTRACT.md section 1, "Connecting").

A JWT (HS256, ``JWT_SECRET``) in ``auth.token`` or an ``Authorization: Bearer`` header; ``sub`` is
the userId (required, the id alphabet of the contract), ``exp`` required and enforced, optional
``roles`` and ``rooms`` (rooms the host application lets the user into).
``BRIDGE_INSECURE_DEV_AUTH=1`` additionally trusts ``auth.userId`` (and ``auth.roles``)
without a token: a development convenience that ``__main__`` warns about and that is never on by
default.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jwt

from contracts.base import ID_PATTERN, MAX_ID_LENGTH

ALGORITHM = "HS256"
MAX_TOKEN_CHARS = 8192
MAX_ROLES = 32
MAX_ROOM_GRANTS = 256
_ID = re.compile(ID_PATTERN)


class AuthError(Exception):
    """The handshake is refused; the message is safe to send back (it never echoes the token)."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    roles: frozenset[str]
    expires_at: float | None = None  # the token's ``exp`` (epoch s): the connection ends then
    rooms: RoomGrants = field(default_factory=lambda: RoomGrants.NONE)  # the JWT ``rooms`` claim


@dataclass(frozen=True, slots=True)
class RoomGrants:
    """Rooms a token lets its user into (CONTRACT.md "Rooms and members"): exact ids, and
    prefixes from patterns ending in ``*`` (``"lobby:*"`` admits ``lobby:7``, not ``lobbyx``)."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    NONE: ClassVar[RoomGrants]

    def admits(self, room_id: str) -> bool:
        return room_id in self.exact or any(room_id.startswith(p) for p in self.prefixes)

    @classmethod
    def parse(cls, value: object) -> RoomGrants:
        """The claim as given; entries that are not an id or ``<id prefix>*`` are ignored."""
        if not isinstance(value, list):
            return cls.NONE
        exact: set[str] = set()
        prefixes: list[str] = []
        for entry in value[:MAX_ROOM_GRANTS]:
            if not isinstance(entry, str):
                continue
            if entry.endswith("*") and _valid_id(entry[:-1]):
                prefixes.append(entry[:-1])
            elif _valid_id(entry):
                exact.add(entry)
        return cls(frozenset(exact), tuple(sorted(set(prefixes))))


RoomGrants.NONE = RoomGrants()


def make_token(
    secret: str,
    user_id: str,
    *,
    roles: Iterable[str] = (),
    ttl_s: int = 3600,
    rooms: Iterable[str] | None = None,
) -> str:
    """A signed token for ``user_id`` (dev tooling, tests and the load tester)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "roles": sorted(roles),
        "iat": now,
        "exp": now + ttl_s,
    }
    if rooms is not None:
        claims["rooms"] = list(rooms)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH and bool(_ID.match(value))


def _roles(value: object) -> frozenset[str]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset(r for r in value[:MAX_ROLES] if _valid_id(r))


class Authenticator:
    """Turns a handshake (``auth`` object and WSGI-style environ) into an ``Identity``."""

    def __init__(self, *, secret: str | None, insecure_dev: bool) -> None:
        self._secret = secret
        self._insecure_dev = insecure_dev

    def identify(self, auth: object, environ: Mapping[str, Any]) -> Identity:
        token = self._token(auth, environ)
        if token is not None:
            return self._verify(token)
        if self._insecure_dev and isinstance(auth, dict) and _valid_id(auth.get("userId")):
            return Identity(auth["userId"], _roles(auth.get("roles")))
        raise AuthError("missing token")

    @staticmethod
    def _token(auth: object, environ: Mapping[str, Any]) -> str | None:
        if isinstance(auth, dict) and auth.get("token") is not None:
            token = auth["token"]
            if not isinstance(token, str):
                raise AuthError("token must be a string")
            return token
        header = environ.get("HTTP_AUTHORIZATION")
        if isinstance(header, str) and header[:7].lower() == "bearer ":
            return header[7:].strip()
        return None

    def _verify(self, token: str) -> Identity:
        if self._secret is None:
            raise AuthError("tokens are not accepted (no JWT_SECRET)")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("invalid token")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid token") from None
        if not _valid_id(claims.get("sub")):
            raise AuthError("invalid token subject")
        return Identity(
            claims["sub"],
            _roles(claims.get("roles")),
            float(claims["exp"]),
            RoomGrants.parse(claims.get("rooms")),
        )
