"""The console's parts that need no hub: its CSRF token and Origin check (behind a proxy too), its cookies,
the headers on every answer (errors and static files included), what an error shows of the values sent, the
bounded wait for a long operation, the audit of its own refusals, and the charts' geometry. The pages
themselves are tested in a real browser on a real hub (tests/test_console.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from hub.ui import charts, security
from hub.ui.templating import environment, web_url


def request(url: str = "http://hub.example:8000/ui/services/x/delete", **headers: str) -> Request:
    scheme, rest = url.split("://")
    host, _, path = rest.partition("/")
    raw = [(b"host", host.encode()), *((k.lower().encode(), v.encode()) for k, v in headers.items())]
    return Request({"type": "http", "method": "POST", "scheme": scheme, "server": None, "path": "/" + path,
                    "root_path": "", "query_string": b"", "headers": raw})


def test_the_csrf_token_is_derived_from_the_session_and_reveals_nothing_of_it() -> None:
    token = "mmh_secret-token"
    assert security.csrf_token(token) == security.csrf_token(token)
    assert security.csrf_token(token) != security.csrf_token(token + "x")
    assert token not in security.csrf_token(token) and len(security.csrf_token(token)) == 64


@pytest.mark.parametrize(("headers", "same"), [
    ({"Origin": "http://hub.example:8000"}, True),
    ({"Origin": "https://hub.example:8000"}, False),
    ({"Origin": "http://evil.example"}, False),
    ({"Origin": "null"}, False),
    # An Origin decides, whatever the Referer says.
    ({"Origin": "http://evil.example", "Referer": "http://hub.example:8000/ui/services"}, False),
    ({"Referer": "http://hub.example:8000/ui/services"}, True),
    ({"Referer": "http://hub.example:8000.evil.example/ui"}, False),
    ({}, False),
])
def test_a_post_counts_as_the_consoles_own_only_from_its_origin(headers: dict[str, str], same: bool) -> None:
    assert security.Site().same_origin(request(**headers)) is same


@pytest.mark.parametrize(("public", "headers", "same"), [
    # Behind a TLS-terminating proxy the hub sees http://10.0.0.5:8000; browsers are at https://hub.example.
    ("https://hub.example", {"Origin": "https://hub.example"}, True),
    ("https://hub.example:443/", {"Origin": "https://hub.example"}, True),
    ("https://Hub.Example/mm", {"Referer": "https://hub.example/mm/ui/services"}, True),
    ("https://hub.example", {"Origin": "http://10.0.0.5:8000"}, False),
    ("https://hub.example", {"Origin": "https://svc.owner.hub.example"}, False),
    ("https://hub.example:8443", {"Origin": "https://hub.example"}, False),
])
def test_behind_a_proxy_a_post_must_come_from_the_console_url(public: str, headers: dict[str, str],
                                                              same: bool) -> None:
    assert security.Site(public).same_origin(request("http://10.0.0.5:8000/ui/logout", **headers)) is same


def test_a_post_without_the_right_token_or_origin_is_refused() -> None:
    site = security.Site()
    expected = security.csrf_token("t")
    site.check_post(request(Origin="http://hub.example:8000"), expected, expected)
    for sent in (None, "", "0" * 64, expected.upper()):
        with pytest.raises(security.CsrfRefused) as refused:
            site.check_post(request(Origin="http://hub.example:8000"), sent, expected)
        assert refused.value.code == "CSRF_REFUSED" and refused.value.status_code == 403
    with pytest.raises(security.CsrfRefused):
        site.check_post(request(Origin="http://evil.example"), expected, expected)


def _set_cookies(response: Response) -> list[str]:
    return [v.decode() for k, v in response.raw_headers if k == b"set-cookie"]


def _attributes(cookie: str) -> dict[str, str]:
    return {a.strip().partition("=")[0].lower(): a.strip().partition("=")[2] for a in cookie.split(";")[1:]}


@pytest.mark.parametrize(("url", "public", "name", "path"), [
    ("http://hub.example/ui/login", "", "mm_session", "/ui"),
    # Over https: a __Host- cookie (Secure, Path=/, no Domain), which a sibling subdomain cannot set or shadow.
    ("https://hub.example/ui/login", "", "__Host-mm_session", "/"),
    # Behind a TLS-terminating proxy: the console URL's scheme decides, not the hop the hub sees.
    ("http://10.0.0.5:8000/ui/login", "https://hub.example", "__Host-mm_session", "/"),
    ("https://10.0.0.5:8000/ui/login", "http://hub.example", "mm_session", "/ui"),
])
def test_the_session_cookie_is_http_only_strict_bounded_and_secure_over_https(url: str, public: str, name: str,
                                                                            path: str) -> None:
    site = security.Site(public, session_seconds=3600)
    response = Response()
    site.set_session(response, request(url), "mmh_token", "/ui")
    cookie = next(c for c in _set_cookies(response) if "mm_session" in c)
    attributes = _attributes(cookie)
    assert cookie.startswith(f"{name}=mmh_token;")
    assert "httponly" in attributes and attributes["samesite"] == "strict" and "domain" not in attributes
    assert attributes["path"] == path and attributes["max-age"] == "3600"
    assert ("secure" in attributes) is name.startswith("__Host-")
    # The session's own cookie is the one read back; the other name is not.
    assert site.session_token(request(url, Cookie=f"{name}=mmh_token")) == "mmh_token"
    other = "mm_session" if name.startswith("__Host-") else "__Host-mm_session"
    assert site.session_token(request(url, Cookie=f"{other}=mmh_token")) is None
    cleared = Response()
    site.clear_session(cleared, request(url), "/ui")
    (gone,) = _set_cookies(cleared)
    assert gone.startswith(f'{name}="";') and "Max-Age=0" in gone and _attributes(gone)["path"] == path
    assert ("secure" in _attributes(gone)) is name.startswith("__Host-")


@pytest.mark.parametrize(("token", "ok"), [
    ("mmh_" + "A-z_9" * 8, True), ("x" * security.MAX_TOKEN, True), ("x" * (security.MAX_TOKEN + 1), False),
    ("mmh_tökén", False), ("mmh_a b", False), ("mmh_\x00", False), ("mmh_\n", False), ("", False),
])
def test_only_printable_ascii_of_bounded_length_can_be_a_token(token: str, ok: bool) -> None:
    assert security.well_formed(token) is ok


def test_the_console_url_setting_takes_one_url_and_bounds_the_session() -> None:
    from pydantic import ValidationError

    from hub.config import HubSettings

    key = {"api_key": "k" * 32}
    assert HubSettings(**key, console_url="https://hub.example/mm").console_url == "https://hub.example/mm"
    assert HubSettings(**key).console_url == "" and HubSettings(**key).console_session_seconds == 12 * 3600
    for bad in ({"console_url": "hub.example"}, {"console_url": "https://a.example,https://b.example"},
                {"console_session_seconds": 0}):
        with pytest.raises(ValidationError):
            HubSettings(**key, **bad)


async def test_every_answer_carries_the_headers_and_only_static_files_are_cached() -> None:
    def boom(_: Request) -> Response:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/page", lambda _: PlainTextResponse("x", headers={"X-Frame-Options": "SAMEORIGIN"})),
                            Route("/static/console.css", lambda _: PlainTextResponse("css")),
                            Route("/boom", boom)])
    transport = httpx.ASGITransport(app=security.SecurityHeaders(app), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        for path in ("/page", "/static/console.css", "/missing", "/boom"):
            answer = await client.get(path)
            assert answer.headers["content-security-policy"] == security.CSP, path
            assert answer.headers.get_list("x-frame-options") == ["DENY"], path
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["referrer-policy"] == "same-origin"
            assert (answer.headers.get("cache-control") == "no-store") is (path != "/static/console.css"), path
    assert "script-src 'self';" in security.CSP and "frame-ancestors 'none'" in security.CSP
    assert "unsafe-inline" not in security.CSP


def test_templates_escape_what_the_hub_returns_and_links_only_to_the_web() -> None:
    page = environment.from_string("<td>{{ v }}</td>").render(v="<script>alert(1)</script>")
    assert page == "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>"
    assert web_url("https://gw.example/s/a/b/") == "https://gw.example/s/a/b/"
    assert web_url("javascript:alert(1)") is None and web_url(None) is None


T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def test_a_chart_spans_its_window_and_breaks_where_nothing_was_measured() -> None:
    times = [T0 + timedelta(minutes=i) for i in range(5)]
    drawn = charts._chart("CPU", times, [("avg", [10.0, 20.0, None, 40.0, None])], charts.percent,
                          start=T0, end=T0 + timedelta(minutes=4))
    assert drawn is not None
    (line,) = drawn.lines
    # One stretch of two values is a line; the lone 40 after the gap is a dot at the window's 3/4.
    assert line.path.count("M") == 1 and line.path.count("L") == 1
    assert line.dots == [(charts.LEFT + (charts.WIDTH - charts.RIGHT - charts.LEFT) * 0.75, line.dots[0][1])]
    assert drawn.top_label == "50%" and line.last == "40%"
    assert (drawn.start_label, drawn.end_label) == ("10:00:00", "10:04:00 UTC")


def test_times_without_a_zone_count_as_utc() -> None:
    naive = charts._chart("CPU", [datetime(2026, 12, 7, 10, 2)], [("avg", [1.0])], charts.percent,
                          start=T0, end=T0 + timedelta(minutes=4))
    assert naive is not None and naive.lines[0].dots[0][0] == charts.LEFT + (charts.WIDTH - charts.RIGHT - charts.LEFT) / 2


def test_no_chart_without_a_measured_value() -> None:
    assert charts._chart("GPU", [T0], [("util", [None])], charts.percent) is None
    assert charts._chart("GPU", [], [("util", [])], charts.percent) is None


@pytest.mark.parametrize(("value", "binary", "top"), [
    (0.0, False, 1.0), (0.3, False, 0.5), (7.0, False, 10.0), (17.0, False, 20.0), (100.0, False, 100.0),
    (804 * 1024.0, True, 1000 * 1024.0), (3.2 * 1024**3, True, 5 * 1024**3),
])
def test_the_axis_top_is_a_round_number(value: float, binary: bool, top: float) -> None:
    assert charts._nice(value, binary) == pytest.approx(top)


def test_the_service_charts_draw_the_traffic_and_gpu_fields_where_present() -> None:
    class Point:
        def __init__(self, i: int, **extra: float | None) -> None:
            self.at = T0 + timedelta(minutes=i)
            self.cpu_percent_avg = self.cpu_percent_max = 5.0
            self.memory_bytes_avg = self.memory_bytes_max = 1024.0**2
            self.__dict__.update(extra)

    plain = charts.service_charts([Point(0), Point(1)])
    assert [c.title for c in plain] == ["CPU", "Memory"]
    full = charts.service_charts([Point(0, requests=3, errors_5xx=0, latency_p50_seconds=0.01,
                                        latency_p95_seconds=0.02, latency_p99_seconds=None,
                                        gpu_util_percent_avg=50.0, gpu_memory_bytes_max=None),
                                  Point(1, requests=5, errors_5xx=1, latency_p50_seconds=0.01,
                                        latency_p95_seconds=0.03, latency_p99_seconds=None,
                                        gpu_util_percent_avg=None, gpu_memory_bytes_max=None)])
    assert [c.title for c in full] == ["CPU", "Memory", "Requests", "Latency", "GPU use"]
    latency = next(c for c in full if c.title == "Latency")
    assert [line.label for line in latency.lines] == ["p50", "p95"] and latency.lines[1].last == "30 ms"


def test_the_controllers_page_shows_load_health_and_gpus() -> None:
    from hub.schemas import ControllerOut

    gpu_server = ControllerOut(
        id="gpu-01", url="http://10.0.0.5:8001", server_type="gpu", enabled=False, priority=1, weight=100,
        status="healthy", last_heartbeat_at=T0, max_containers=10, containers_running=3, load_percentage=42.0,
        memory_usage_percent=61.2, gpus=[{"index": "0", "model": "NVIDIA A100", "memory_mb": 40960, "in_use": True},
                                         {"index": "1", "model": "<b>odd</b>", "memory_mb": 0}], error=None)
    page = environment.get_template("controllers.html").render(
        base="/ui", me={"username": "root", "admin": True}, csrf="c" * 64, error=None, done="",
        controllers=[gpu_server])
    assert 'value="42.0"' in page and "61%" in page and "3 / 10" in page
    assert "#0 NVIDIA A100 · 40960 MiB · in use" in page and "#1 &lt;b&gt;odd&lt;/b&gt;" in page
    # Disabled: it offers Enable (a plain form) and Drain (confirmed), each with the CSRF token.
    assert 'action="/ui/controllers/gpu-01/enable"' in page and 'data-confirm="Drain gpu-01?' in page
    assert page.count('name="csrf" value="' + "c" * 64 + '"') == 3  # log out, enable, drain


def test_the_deploy_form_reads_yaml_json_or_a_model_type_and_leaves_judging_to_the_api() -> None:
    from hub.errors import HubError
    from hub.ui.pages import _spec_of

    assert _spec_of({"mode": "spec", "spec": "name: a\nimage: x:1\nreplicas: 2\n"}) == {
        "name": "a", "image": "x:1", "replicas": 2}
    assert _spec_of({"mode": "spec", "spec": '{"name": "a", "ports": {"5000": null}}'}) == {
        "name": "a", "ports": {"5000": None}}
    assert _spec_of({"mode": "model", "model": "dnabert2", "name": "d", "replicas": "3", "spec": "ignored"}) == {
        "model": "dnabert2", "name": "d", "replicas": 3}
    # Not a number: sent as it is, for the API's own validation error.
    assert _spec_of({"mode": "model", "model": "m", "name": "d", "replicas": "many"})["replicas"] == "many"
    for text in ("name: [unclosed", "- a list", "", "just text"):
        with pytest.raises(HubError) as refused:
            _spec_of({"mode": "spec", "spec": text})
        assert refused.value.code == "INVALID_SPEC_TEXT" and refused.value.status_code == 422


def test_an_api_error_is_shown_with_its_code_message_and_the_values_sent() -> None:
    from hub.ui.pages import error_view
    from mmanager.client import ApiError

    refused = ApiError(422, "VALIDATION_ERROR", "the request is invalid", [
        {"loc": ["body", "name"], "msg": "String should match pattern", "type": "string_pattern_mismatch"},
        {"loc": ["body", "resources", "cpu_limit"], "msg": "Input should be greater than 0", "input": -1},
        {"loc": ["body", "missing"], "msg": "Field required"}])
    view = error_view(refused, {"name": "<script>", "resources": {"cpu_limit": -1}})
    assert view == {"status": 422, "code": "VALIDATION_ERROR", "message": "the request is invalid", "lines": [
        'name: String should match pattern (got "<script>")',
        "resources.cpu_limit: Input should be greater than 0 (got -1)",
        "missing: Field required"]}
    # No HTTP answer carried it (an operation that failed while waited for): shown all the same.
    failed = error_view(ApiError(0, "IMAGE_PULL_FAILED", "pulling 'x' failed", {"image": "x"}))
    assert failed["status"] == 502 and failed["lines"] == ["image: x"]


def test_an_error_never_shows_what_was_sent_under_registry_auth_secrets_or_env() -> None:
    from hub.ui.pages import error_view
    from mmanager.client import ApiError

    password = "hunter2-registry-password"
    sent = {"name": "a", "registry_auth": {"username": "u", "password": password}, "env": {"KEY": "env-secret"},
            "secrets": ["s-secret"], "ports": {"5000": None}, "health_check": {"env": {"X": "nested-secret"}}}
    refused = ApiError(422, "VALIDATION_ERROR", "the request is invalid", [
        {"loc": ["body", "registry_auth", "password"], "msg": "Input should be a valid string"},
        {"loc": ["body", "env", "KEY"], "msg": "Value error", "input": "env-secret"},
        {"loc": ["body", "secrets", 0], "msg": "bad"},
        {"loc": ["body", "health_check"], "msg": "bad"},
        {"loc": ["body", "ports"], "msg": "bad"}])
    lines = error_view(refused, sent)["lines"]
    assert lines[:3] == ["registry_auth.password: Input should be a valid string", "env.KEY: Value error",
                         "secrets.0: bad"]
    # A value shown whole leaves out what it holds under those names, at any depth.
    assert lines[3:] == ['health_check: bad (got {})', 'ports: bad (got {"5000": null})']
    assert not any(s in str(lines) for s in (password, "env-secret", "s-secret", "nested-secret"))


async def test_a_long_operation_is_waited_for_a_bounded_time_then_left_running() -> None:
    from hub.ui.pages import settle
    from mmanager.client import ApiError, AsyncClient

    states = {"op-run": "running", "op-ok": "succeeded", "op-bad": "failed"}

    def answer(request: httpx.Request) -> httpx.Response:
        op_id = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, json={
            "id": op_id, "operation": "scale", "status": states[op_id], "service_id": "s" * 32, "controller_id": None,
            "actor": "root", "details": {"progress": {"done": 1, "total": 2, "unit": "replicas", "step": "x"}},
            "error": "IMAGE_PULL_FAILED: pulling failed" if op_id == "op-bad" else None,
            "container_id": None, "finished_at": None, "created_at": "2026-12-07T10:00:00",
            "updated_at": "2026-12-07T10:00:00"})

    async with AsyncClient(url="http://hub", token="t", transport=httpx.MockTransport(answer)) as api:
        started = [await api.operations.get("op-run")]
        running = await settle(api, started, timeout=0.2)
        assert running is not None and running.id == "op-run"
        assert await settle(api, [await api.operations.get("op-ok")]) is None
        assert await settle(api, []) is None  # nothing was to be done
        with pytest.raises(ApiError) as failed:
            await settle(api, [await api.operations.get("op-bad")])
        assert failed.value.code == "IMAGE_PULL_FAILED"


async def test_the_consoles_own_requests_are_audited_only_when_it_marks_a_refusal() -> None:
    from mmanager.audit import AuditMiddleware, refused_call, skip_call
    from mmanager.wire import AuditEvent

    recorded: list[AuditEvent] = []

    async def record(event: AuditEvent) -> None:
        recorded.append(event)

    def page(request: Request) -> Response:
        skip_call(request.scope)
        if request.query_params.get("refuse"):
            refused_call(request.scope, "CSRF_REFUSED", "not from this console's pages")
            return PlainTextResponse("<html>refused</html>", status_code=403)
        return PlainTextResponse("<html>done</html>", status_code=303 if request.method == "POST" else 404)

    app = AuditMiddleware(Starlette(routes=[Route("/ui/x", page, methods=["GET", "POST"])]), record=record)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
        await client.post("/ui/x")
        await client.get("/ui/x")
        await client.post("/ui/x?refuse=1")
    (event,) = recorded
    assert (event.path, event.status_code, event.error_code) == ("/ui/x", 403, "CSRF_REFUSED")
    assert event.details["message"] == "not from this console's pages"
