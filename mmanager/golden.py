"""Golden-inference probes: comparing a service's answer to a fixed input with the answer it must give.

Pure and shared (the controller judges, the hub validates specs). ``mismatch`` is the one rule, documented
in docs/API.md: objects match when every expected key is present and matches (extra keys are allowed);
lists when they have the same length and match element by element; numbers (bools are not numbers) when
``|got - expected| <= tolerance``; every other value when it is equal. Invariant: ``mismatch`` returns None
exactly when the answer matches, else one line saying where (a dotted path) and what.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Longest rendering of one value in a mismatch's description.
SHOWN = 80


def _shown(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _where(path: str) -> str:
    return path or "the answer"


def mismatch(got: Any, expected: Any, tolerance: float, path: str = "") -> str | None:
    """None when ``got`` matches ``expected`` (the rules above); else ``"<path>: expected X, got Y"``."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{_where(path)}: expected an object, got {_shown(got)}"
        for key, want in expected.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in got:
                return f"{where}: missing (expected {_shown(want)})"
            found = mismatch(got[key], want, tolerance, where)
            if found is not None:
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(got, list):
            return f"{_where(path)}: expected a list, got {_shown(got)}"
        if len(got) != len(expected):
            return f"{_where(path)}: expected {len(expected)} items, got {len(got)}"
        for index, (item, want) in enumerate(zip(got, expected, strict=True)):
            found = mismatch(item, want, tolerance, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    if _is_number(expected):
        if not _is_number(got):
            return f"{_where(path)}: expected {_shown(expected)}, got {_shown(got)}"
        try:
            difference = abs(float(got) - float(expected))
        except OverflowError:  # an integer beyond any float
            difference = math.inf
        # NaN never matches: no comparison with it is true.
        if not difference <= tolerance:
            return f"{_where(path)}: expected {_shown(expected)}, got {_shown(got)}"
        return None
    # JSON's true is not 1: a bool matches only a bool.
    if got != expected or isinstance(got, bool) != isinstance(expected, bool) or _is_number(got):
        return f"{_where(path)}: expected {_shown(expected)}, got {_shown(got)}"
    return None
