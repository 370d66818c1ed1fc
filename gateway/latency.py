"""The HAProxy lines that feed the gateway's latency histograms (``latency.lua``, shipped beside this file)
and serve them, for the configuration renderer to include; the Lua file's header says why each is there.

Invariant: these lines and ``latency.lua`` change together (the variable names, the observation string's
fields, the registered names); the tests run HAProxy on exactly these lines.
"""

from __future__ import annotations

from pathlib import Path

LUA = Path(__file__).with_name("latency.lua")
METRIC = "mmanager_gateway_request_duration_seconds"
# Where the metrics frontend serves the histograms; HAProxy's own exporter stays at /metrics.
PATH = "/metrics/latency"

# In global.
LOAD = f"lua-load {LUA}"
# The gateway frontend's first http-request rule.
START = "http-request set-var(txn.mm_t0) date(0,us)"
# The gateway frontend's http-after-response rules.
OBSERVE = (
    'http-after-response set-var-fmt(txn.mm_obs) "%[date(0,us),sub(txn.mm_t0)] %[status,div(100)] %b %s '
    '%[var(txn.mm_service)]"',
    "http-after-response set-var(txn.mm_obs) var(txn.mm_obs),lua.mm_latency_observe",
)
# The metrics frontend's.
SERVE = f"http-request use-service lua.mm_latency_metrics if {{ path {PATH} }}"


def service_rule(owner: str, name: str) -> str:
    """The rule of a service's backend that labels its responses ``service="<owner>/<name>"`` (both names
    match hub.schemas.NAME_PATTERN, which HAProxy's ``str()`` takes as they are)."""
    return f"http-request set-var(txn.mm_service) str({owner}/{name})"
