"""Two roles: readers (trainers) fetch data and report progress; operators may also change state."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import Request

from mixer_contract.errors import InvalidInput
from mixer_service.service.problems import ProblemError


@dataclass(frozen=True)
class Tokens:
    operator: str | None
    reader: str | None

    @property
    def enabled(self) -> bool:
        return bool(self.operator or self.reader)


def _matches(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def role_of(request: Request, tokens: Tokens) -> str:
    if not tokens.enabled:
        return "operator"
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ProblemError(401, "Unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if _matches(token, tokens.operator):
        return "operator"
    if _matches(token, tokens.reader):
        return "reader"
    raise ProblemError(401, "Unauthorized", "invalid token", {"WWW-Authenticate": "Bearer"})


async def require_reader(request: Request) -> str:
    return role_of(request, request.app.state.tokens)


async def require_operator(request: Request) -> str:
    role = role_of(request, request.app.state.tokens)
    if role != "operator":
        raise ProblemError(403, "Forbidden", "this action needs the operator token")
    return role


def check_bind(host: str, tokens: Tokens, force: bool) -> None:
    """Refuse to expose an unauthenticated service beyond this machine unless explicitly forced."""
    if tokens.enabled or force:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidInput(f"--host {host}: binding to a non-loopback address needs MIXER_OPERATOR_TOKEN and "
                           "MIXER_READER_TOKEN (or --insecure-bind to force)")
