"""Identities for the simulated users: JWTs minted from the shared secret, or read from a file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jwt

__all__ = ["DEFAULT_TOKEN_TTL_S", "User", "load_users", "mint_token", "mint_users"]

DEFAULT_TOKEN_TTL_S = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class User:
    """One simulated user: its id, its token, and the room only it writes to."""

    index: int
    user_id: str
    token: str
    room_id: str


def mint_token(
    secret: str, user_id: str, *, ttl_s: float = DEFAULT_TOKEN_TTL_S, roles: tuple[str, ...] = ()
) -> str:
    """An HS256 JWT with ``sub`` = ``user_id``, ``exp`` and optional ``roles`` (CONTRACT.md 1)."""
    claims: dict[str, object] = {"sub": user_id, "exp": int(time.time() + ttl_s)}
    if roles:
        claims["roles"] = list(roles)
    return jwt.encode(claims, secret, algorithm="HS256")


def mint_users(secret: str, count: int, *, run_id: str, roles: tuple[str, ...] = ()) -> list[User]:
    """``count`` users ``lt-<run>-u<i>``, each in its own room ``lt-<run>-r<i>``.

    Ids carry the run id so a second run never lands in a room a previous run's user owns.
    """
    return [
        User(
            index=i,
            user_id=f"lt-{run_id}-u{i}",
            token=mint_token(secret, f"lt-{run_id}-u{i}", roles=roles),
            room_id=f"lt-{run_id}-r{i}",
        )
        for i in range(count)
    ]


def load_users(path: Path, count: int, *, run_id: str) -> list[User]:
    """Users from a file of JWTs, one per line; ``sub`` is read (not verified) for the user id.

    With fewer tokens than ``count`` users, the tokens are reused: several connections then share
    a user id, each still in its own room.
    """
    tokens = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"no tokens in {path}")
    users = []
    for i in range(count):
        token = tokens[i % len(tokens)]
        claims = jwt.decode(token, options={"verify_signature": False})
        users.append(
            User(index=i, user_id=str(claims["sub"]), token=token, room_id=f"lt-{run_id}-r{i}")
        )
    return users
