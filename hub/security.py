"""API tokens, controller keys and service keys: minted once, shown once, stored as SHA-256 (they carry 256 random
bits, so a plain hash is enough: no dictionary reaches them)."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "mmh_"
CONTROLLER_KEY_PREFIX = "mmc_"
SERVICE_KEY_PREFIX = "mms_"


def mint_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def mint_controller_key() -> str:
    return CONTROLLER_KEY_PREFIX + secrets.token_urlsafe(32)


def mint_service_key() -> str:
    return SERVICE_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
