"""Sealing secrets the hub stores (a service's registry credentials and ``secrets``): AES-256-GCM under
the hub key.

A sealed value is text, ``<key id>:<urlsafe base64 of nonce + ciphertext>``; the key id is the first bytes of
the key's SHA-256, so a value sealed under one key is told apart from another's. A ``Sealer`` seals under its
current key and opens with the current key or any previous one (``MMANAGER_HUB_KEY_PREVIOUS``) the value's id
names: so a key rotation needs no hub to stop (``mmanager hub-key rotate`` re-seals what the old key sealed).
Invariant: nothing leaves this module in clear except what ``open`` returns, and a value sealed here opens
only under the same key and with the same associated data (what the value belongs to, authenticated but not
stored in it): the AEAD refuses any change, and any other key or data (``SealError``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE_BYTES = 12
# Authenticated with every value: a sealed value of another purpose or product does not open here.
_CONTEXT = b"mmanager-sealed-v1"


class SealError(ValueError):
    """A sealed value that does not open: another key's, cut, or changed."""


def parse_key(text: str) -> bytes:
    """The hub key from its text: base64 (standard or urlsafe, as ``openssl rand -base64 32`` writes it) of
    exactly 32 bytes. Raises ``ValueError`` saying what is wrong, never echoing the key."""
    raw = text.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the hub key is not base64; make one with `openssl rand -base64 32`") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"the hub key is {len(key)} bytes, not {KEY_BYTES}; make one with `openssl rand -base64 32`")
    return key


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


class Sealer:
    """Seals under the current hub key; opens with it or with a previous one (a rotation under way)."""

    def __init__(self, key: bytes, previous: Sequence[bytes] = ()) -> None:
        if any(len(k) != KEY_BYTES for k in (key, *previous)):
            raise ValueError(f"a hub key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self.key_id = key_id(key)
        # The current key last: a previous key that is the current one again opens as the current one.
        self._opens = {key_id(k): AESGCM(k) for k in (*previous, key)}

    @property
    def previous_ids(self) -> list[str]:
        """The ids of the keys this sealer only opens with."""
        return [kid for kid in self._opens if kid != self.key_id]

    @staticmethod
    def sealed_key_id(sealed: str) -> str:
        """The id of the key ``sealed`` was sealed under (no key needed to read it)."""
        return sealed.partition(":")[0]

    def seal(self, value: bytes | str, associated: bytes = b"") -> str:
        """``value`` sealed; ``associated``: what it belongs to, needed again (the same) to open it."""
        data = value.encode() if isinstance(value, str) else value
        nonce = os.urandom(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, data, self._associated(self.key_id, associated))
        return f"{self.key_id}:{base64.urlsafe_b64encode(sealed).decode()}"

    def open(self, sealed: str, associated: bytes = b"") -> str:
        kid, _, body = sealed.partition(":")
        aead = self._opens.get(kid)
        if aead is None:
            raise SealError(f"sealed under another hub key (id {kid!r}; this hub's is {self.key_id!r}"
                            + (f", and it still opens {', '.join(map(repr, self.previous_ids))}"
                               if self.previous_ids else "") + ")")
        try:
            raw = base64.urlsafe_b64decode(body.encode())
            data = aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._associated(kid, associated))
            return data.decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise SealError("the sealed value is damaged, was changed, or belongs to something else") from None

    def reseal(self, sealed: str, associated: bytes = b"") -> str | None:
        """``sealed`` sealed again under the current key (a rotation), or None when it already is; raises
        ``SealError`` when it does not open."""
        if self.sealed_key_id(sealed) == self.key_id:
            return None
        return self.seal(self.open(sealed, associated), associated)

    @staticmethod
    def _associated(kid: str, associated: bytes) -> bytes:
        # Length-prefixed, so no two (key id, data) pairs make the same bytes.
        return _CONTEXT + kid.encode() + len(associated).to_bytes(4, "big") + associated
