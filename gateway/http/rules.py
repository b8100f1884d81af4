"""Pure request rules both front ends apply after parsing, so they refuse the same requests.

The parser (llhttp, or aiohttp's) checks the syntax; these are the checks it leaves
to the server, each one a request HAProxy refuses too. No I/O, no HTTP library.
"""

from __future__ import annotations

# Limits no looser than aiohttp's defaults (8190-byte request line and header fields);
# the whole head is bounded as HAProxy's buffer bounds it.
MAX_TARGET = 8190
MAX_FIELD = 8190
MAX_HEAD = 16384
MAX_HEADERS = 100


def refusal(
    target: str,
    host: str | None,
    upgrade: str | None = None,
    websocket_key: bool = False,
    transfer_encoding: str | None = None,
) -> tuple[int, str] | None:
    """Status and reason to refuse a parsed request with, or None to serve it."""
    if "#" in target:
        return 400, "a request target has no fragment"
    if not target.startswith("/") and "://" in target:
        # RFC 9112 3.2.2 lets the target's authority override Host; a proxy in front of this
        # one may have routed on Host, so a request naming two hosts is refused (as HAProxy does).
        authority = target.partition("://")[2].partition("/")[0].partition("?")[0]
        if host is not None and authority.lower() != host.strip().lower():
            return 400, "the request target and Host name different hosts"
    if upgrade is not None and "websocket" in upgrade.lower() and not websocket_key:
        return 400, "a WebSocket handshake needs Sec-WebSocket-Key"  # RFC 6455 4.2.1
    if transfer_encoding is not None:
        codings = [c.strip() for c in transfer_encoding.lower().split(",")]
        if codings[-1] != "chunked":
            return 400, "a request body's last transfer coding must be chunked"  # RFC 9112 6.3
        if len(codings) > 1:
            return 501, "transfer codings other than chunked are not supported"  # RFC 9112 6.1
    return None


def version_refusal(major: int, minor: int) -> tuple[int, str] | None:
    """HTTP/1.0 and HTTP/1.1 are served; HTTP/0.9 is refused, 2 and later are not spoken here."""
    if major == 1 and minor in (0, 1):
        return None
    if major >= 2:
        return 505, f"HTTP/{major}.{minor} is not supported"
    return 400, f"HTTP/{major}.{minor} is not supported"
