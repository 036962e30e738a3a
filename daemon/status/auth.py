"""Bearer-token access to the status endpoint: who may read what.

With a token configured, every path but the two probes wants `Authorization: Bearer <token>`
(RFC 6750); anything else is answered 401 with `WWW-Authenticate: Bearer realm="backfilld"`,
before routing, so an unauthenticated client cannot tell a real path from a made-up one.
`/healthz` and `/readyz` stay open: load balancers and systemd-style probes carry no secrets,
and their answers reveal nothing but up/ready.

The comparison is constant-time over SHA-256 digests (`hmac.compare_digest`): neither the
token's bytes nor its length can be timed out of the server.

Error handling: nothing here raises for what a client sends; a malformed header is a 401 like
a missing one. The token is never logged, and no answer quotes what the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from ..config import Secret
from ..httpserver import Response

__all__ = ["OPEN_PATHS", "REALM", "BearerAuth", "unauthorized"]

# Paths answered without a token (after the app's normalisation: no trailing slash).
OPEN_PATHS = frozenset({"/", "/dashboard", "/healthz", "/readyz"})
REALM = "backfilld"
_CHALLENGE = f'Bearer realm="{REALM}"'


class BearerAuth:
    """Checks requests against one token. Holds only the token's digest, never the text."""

    def __init__(self, token: Secret) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in")
        self._digest = _digest(token.reveal().encode("ascii"))

    def allows(self, headers: Mapping[str, str]) -> bool:
        """True when `headers` (lowercased names, as daemon.httpserver gives them) carry
        `Authorization: Bearer <the token>`. The scheme is case-insensitive (RFC 7235)."""
        scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # httpserver decoded the header as latin-1: encoding it back gives the bytes sent
        presented = credentials.strip().encode("latin-1", errors="replace")
        return hmac.compare_digest(_digest(presented), self._digest)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def unauthorized() -> Response:
    """The 401 for a missing or wrong token: the same answer whatever was (not) sent."""
    return Response.json(
        {"error": "unauthorized",
         "reason": "this endpoint requires the header Authorization: Bearer <status token>"},
        401, {"www-authenticate": _CHALLENGE, "cache-control": "no-store"})
