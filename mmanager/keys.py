"""Which keys are too weak to guard a Docker daemon: one rule for the hub and the controllers.

A controller's key opens its Docker daemon, which is root on its server; the
hub and the controllers refuse to start with an empty, short or well-known key
unless they run in dev mode.
"""

from __future__ import annotations

# Keys that appear in public documents (the seed among them) or are obvious placeholders.
WELL_KNOWN_KEYS = frozenset(
    {
        "mmanager-secure-key-12345",
        "your-secure-api-key",
        "mmanager-default-key",
        "changeme",
        "change-me",
        "secret",
        "password",
        "api-key",
        "apikey",
        "test",
    }
)
MIN_KEY_LENGTH = 16


def key_problem(key: str | None) -> str | None:
    """Why a key is unfit for production, or None when it is fine."""
    if not key:
        return "it is empty"
    if key.lower() in WELL_KNOWN_KEYS:
        return "it is a well-known placeholder"
    if len(key) < MIN_KEY_LENGTH:
        return f"it is shorter than {MIN_KEY_LENGTH} characters"
    return None
