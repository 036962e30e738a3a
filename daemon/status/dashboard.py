"""The dashboard at `/`: one self-contained HTML page (inline CSS and script, no CDN, no build
step) that polls the JSON endpoints every few seconds.

The page holds no data, so it is served without a token; its script asks for the token once
when an endpoint answers 401 (or takes it from a `#token=` fragment), keeps it in session
storage and sends it as a bearer token. Everything it shows is inserted as text, never HTML.
"""

from __future__ import annotations

import functools
from importlib import resources

from ..httpserver import Response

__all__ = ["CONTENT_SECURITY_POLICY", "dashboard_response"]

# Inline script and style are the page's own; it talks only to this origin.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; "
                           "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.cache
def _page() -> bytes:
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()


def dashboard_response() -> Response:
    return Response(200, {"content-type": "text/html; charset=utf-8",
                          "content-security-policy": CONTENT_SECURITY_POLICY,
                          "x-content-type-options": "nosniff",
                          "referrer-policy": "no-referrer",
                          "cache-control": "no-cache"}, _page())
