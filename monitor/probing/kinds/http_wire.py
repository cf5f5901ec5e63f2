"""An HTTP/1.1 probe's response, read without I/O: the status, a capped body.

This is the default http probe (fresh connection, no redirects). aiohttp's
client spent more CPU per probe on its request machinery than on the
connection itself (profiled: 57% of the daemon's time at 1,000 probes/s); a
probe needs none of it: the request bytes are built once per target, and the
response is read to the status, headers and a capped body.

`ResponseReader` is fed what the socket gives, by the probe worker's own loop
(probing/worker.py) or by an asyncio Protocol in the daemon (http_exchange.py).
Standard library only, and not even `ssl` until a TLS probe needs it: the worker
imports this module and stays a few MB.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing itself is not imported: the worker stays small
if TYPE_CHECKING:
    import ssl

MAX_HEAD = 64 * 1024


def insecure_context() -> ssl.SSLContext:
    """TLS without verification (`tls_verify: false`): `ssl.create_default_context()`'s
    settings without the CA certificates it loads and would never read (~0.8 MB of RSS)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class ProbeProtocolError(Exception):
    """The server's answer is not HTTP/1.x we can read."""


class ResponseReader:
    """One response, fed as it arrives: `feed` says when it is complete (the head, then
    the body to its length, its last chunk or `cap` bytes); the end of the stream
    completes it once the head is in."""

    __slots__ = ("buffer", "cap", "chunked", "head_end", "length", "status")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.buffer = bytearray()
        self.status = 0
        self.head_end = -1
        self.length: int | None = None
        self.chunked = False

    def feed(self, data: bytes) -> bool:
        """True once the response is complete. Raises ProbeProtocolError."""
        self.buffer += data
        if self.head_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise ProbeProtocolError("response head over 64 KiB")
                return False
            self.head_end = end + 4
            self._parse_head(bytes(self.buffer[:end]))
        return self._complete(len(self.buffer) - self.head_end)

    def end(self) -> None:
        """The server closed the stream. Raises ProbeProtocolError before the head."""
        if self.head_end < 0:
            raise ProbeProtocolError("server closed the connection")

    def body(self) -> bytes:
        raw = bytes(self.buffer[self.head_end : self.head_end + self.cap])
        return _dechunk(raw, self.cap) if self.chunked else raw

    def _complete(self, body: int) -> bool:
        if body >= self.cap:
            return True
        if self.length is not None:
            return body >= self.length
        return self.chunked and self.buffer.endswith(b"0\r\n\r\n")

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProbeProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                self.length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
        if self.status in (204, 304) or 100 <= self.status < 200:
            self.length = 0


def describe_os_error(exc: BaseException) -> str | None:
    """A short reason for a certificate or socket error; None for anything else."""
    ssl = sys.modules.get("ssl")  # no TLS error without it: not imported for this
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate: {exc.verify_message}"
    ssl_error = ssl.SSLError if ssl is not None else ()
    if isinstance(exc, OSError) and not isinstance(exc, ssl_error) and exc.strerror:
        return f"connect: {exc.strerror}"
    return None


def short_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def peer_certificate_expiry(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> float | None:
    """When the peer's certificate expires (wall clock); None without a verified TLS peer."""
    if ssl_object is None:
        return None
    import ssl

    certificate = ssl_object.getpeercert()  # parsed only when verified; {} otherwise
    not_after = certificate.get("notAfter") if certificate else None
    return ssl.cert_time_to_seconds(not_after) if isinstance(not_after, str) else None


def _dechunk(raw: bytes, cap: int) -> bytes:
    out = bytearray()
    position = 0
    while position < len(raw) and len(out) < cap:
        end = raw.find(b"\r\n", position)
        if end < 0:
            break
        size_text = raw[position:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            break
        if size == 0:
            break
        start = end + 2
        out += raw[start : start + size]
        position = start + size + 2
    return bytes(out[:cap])
