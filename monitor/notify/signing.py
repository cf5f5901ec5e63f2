"""Webhook signatures: receivers check a body came from this daemon and was not altered."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Hms-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
