"""The tls probe: a connection and a TLS handshake, nothing sent; the result carries
the certificate's expiry."""

from __future__ import annotations

from monitor.probing.kinds.tcp import TcpKind


class TlsKind(TcpKind):
    """A tcp probe that also completes the handshake (checked unless tls_verify is off)."""

    tls = True
