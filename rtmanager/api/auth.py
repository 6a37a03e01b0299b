"""Who is calling: bearer tokens mapped to principals, and what they may do.

`RTMANAGER_AUTH_TOKENS` is `game_master=TOKEN,admin=TOKEN` (a role may appear
more than once, for rotation) or `@path` to a file holding that text. A Game
Master caller is recorded as op_source `gm_rest`, an admin as `admin_rest`.
Admin RPCs need the admin role. With no tokens configured every caller is
trusted as admin, which is why the server then binds only to loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc

from rtmanager.domain.operation import OpSource


class Role(StrEnum):
    """What a token lets its holder do."""

    GAME_MASTER = "game_master"
    ADMIN = "admin"


_OP_SOURCE = {Role.GAME_MASTER: OpSource.GM_REST, Role.ADMIN: OpSource.ADMIN_REST}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    role: Role

    @property
    def op_source(self) -> OpSource:
        """How this caller's operations are recorded."""
        return _OP_SOURCE[self.role]


class AuthConfigError(ValueError):
    """RTMANAGER_AUTH_TOKENS is malformed."""


class AuthFailure(Exception):
    """A call without valid credentials or without the needed role."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def parse_auth_tokens(spec: str) -> dict[str, Role]:
    """Parse the token setting into token -> role; raise `AuthConfigError` if malformed."""
    spec = spec.strip()
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            spec = path.read_text().strip()
        except OSError as error:
            raise AuthConfigError(f"RTMANAGER_AUTH_TOKENS file {path}: {error}") from None
    tokens: dict[str, Role] = {}
    for part in filter(None, (item.strip() for item in spec.replace("\n", ",").split(","))):
        name, sep, token = part.partition("=")
        try:
            role = Role(name.strip())
        except ValueError:
            raise AuthConfigError(
                f"RTMANAGER_AUTH_TOKENS: unknown role {name.strip()!r}; expected "
                "game_master or admin"
            ) from None
        token = token.strip()
        if not sep or len(token) < 16:
            raise AuthConfigError(
                f"RTMANAGER_AUTH_TOKENS: the {role} token must be at least 16 characters"
            )
        if token in tokens and tokens[token] is not role:
            raise AuthConfigError("RTMANAGER_AUTH_TOKENS: one token is given to two roles")
        tokens[token] = role
    return tokens


def is_loopback_address(address: str) -> bool:
    """Report whether a host:port listen address binds only to loopback."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Checks the bearer token of each call."""

    def __init__(self, tokens: dict[str, Role]) -> None:
        self._tokens = [(token.encode(), role) for token, role in tokens.items()]

    @property
    def enabled(self) -> bool:
        """True when tokens are configured."""
        return bool(self._tokens)

    def authenticate(self, context: grpc.ServicerContext, *, admin_only: bool) -> Principal:
        """Return the caller's principal; raise `AuthFailure` when it may not call."""
        if not self._tokens:
            return Principal(Role.ADMIN)
        presented = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                scheme, _, credential = text.partition(" ")
                if scheme.lower() == "bearer":
                    presented = credential.strip().encode()
                break
        role = self._lookup(presented) if presented else None
        if role is None:
            raise AuthFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                "unauthenticated",
                "a valid 'authorization: Bearer <token>' header is required",
            )
        if admin_only and role is not Role.ADMIN:
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                "permission_denied",
                "this RPC needs the admin role",
            )
        return Principal(role)

    def _lookup(self, presented: bytes) -> Role | None:
        found: Role | None = None
        # Compare against every token in constant time per comparison.
        for token, role in self._tokens:
            if hmac.compare_digest(token, presented):
                found = role
        return found
