"""The console's pages and forms (``/ui``): each reads and changes the hub through the SDK's ``AsyncClient``
on the hub's own application in process, with the signed-in user's token, so tenancy, validation, audit
and error codes are the API's. The one exception is the followed log, which streams: it calls the API's
own logs handler with the user the session's token admits.

Every POST is checked (``Site.check_post``) before anything is done; a change that cannot be undone
is done only once confirmed (``confirmed=yes``: set by the page's script after the browser's dialog, or
by the confirmation page that answers a form sent without it). A long operation is sent without waiting
and waited for at most ``WAIT_SECONDS``; one still running then is shown, with its progress, on the page it
concerns. An error the hub answers is shown as its code and message on the page it came from, with the
hub's status, and never with a value sent under ``SECRET_FIELDS``.

One console action is one audit row: the API call it makes (with the browser's address and this request's
id). The ``/ui`` requests themselves are kept out of the trail (``hub.ui.console``), except the refusals the
console makes itself (``refusal``): a CSRF refusal, a login refused before any API call, a bad form.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
import yaml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from hub.deps import admit
from hub.errors import HubError, InvalidRequest
from hub.job_schemas import JOB_FINAL
from hub.routers import services as services_api
from hub.schemas import OperationOut
from hub.services.users import as_user
from hub.ui import security
from hub.ui.charts import service_charts, utc
from hub.ui.templating import templates
from mmanager.audit import identify_call, refused_call
from mmanager.client import ApiError, AsyncClient, Me
from mmanager.client.errors import from_operation_error
from mmanager.logs import current_request_id

router = APIRouter()

# The in-process hub's address: a name only (the transport never opens a socket).
INTERNAL_URL = "http://hub.console"
# One call to the in-process API (a long operation is not waited for within one).
CALL_TIMEOUT = 60.0
# Seconds a long operation (deploy, migrate, scale, rollback, drain...) is waited for in the browser's request;
# one still running then is left to run, and its page shows its progress.
WAIT_SECONDS = 20.0
# Where the hub strips the values of a refused request, the console does not show them either.
SECRET_FIELDS = frozenset({"registry_auth", "secrets", "env"})
PAGE = 50
# Lines of a service's log shown when its page opens.
LOG_TAIL = 100


class SignIn(Exception):
    """No session, or its token is no longer accepted: to the login page."""

    def __init__(self, expired: bool = False) -> None:
        self.expired = expired


@dataclass
class Session:
    token: str
    api: AsyncClient
    me: Me
    csrf: str


def base(request: Request) -> str:
    """Where the console is mounted (``/ui``, behind any prefix the hub is served under)."""
    return str(request.scope.get("root_path", ""))


def site(request: Request) -> security.Site:
    site: security.Site = request.app.state.site
    return site


class _Correlated(httpx.AsyncBaseTransport):
    """The in-process transport, each call carrying the browser's request's id (``X-Request-ID``): the API's
    log lines and audit row of a console action name the request that made it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, request_id: str | None) -> None:
        self.inner = inner
        self.request_id = request_id

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.request_id:
            request.headers["X-Request-ID"] = self.request_id
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def connect(request: Request, token: str) -> AsyncClient:
    """The SDK on this hub's own application, in process; the API sees the browser's address as the caller's."""
    client = request.client
    transport = httpx.ASGITransport(app=request.app.state.api,
                                    client=(client.host, client.port) if client else ("127.0.0.1", 0))
    return AsyncClient(url=INTERNAL_URL, token=token, transport=_Correlated(transport, current_request_id()),
                       timeout=CALL_TIMEOUT)


async def signed_in(request: Request) -> AsyncIterator[Session]:
    token = site(request).session_token(request)
    if not token:
        raise SignIn()
    if not security.well_formed(token):
        # No API token looks like this one: an ended session (the cookie is cleared), not an error.
        raise SignIn(expired=True)
    api = connect(request, token)
    try:
        try:
            me = await api.me()
        except ApiError as exc:
            if exc.status == 401:
                raise SignIn(expired=True) from None
            raise
        # A refusal the console makes itself (its audit row) names the user, as the API calls it makes do.
        identify_call(request.scope, me.username)
        session = Session(token, api, me, security.csrf_token(token))
        request.state.session = session
        yield session
    finally:
        await api.aclose()


SessionDep = Annotated[Session, Depends(signed_in)]


async def posted(request: Request, session: SessionDep) -> FormData:
    """The POST's form, once its origin and CSRF token are checked."""
    form = await request.form()
    site(request).check_post(request, form.get(security.CSRF_FIELD), session.csrf)
    return form


FormDep = Annotated[FormData, Depends(posted)]


def render(request: Request, template: str, status: int = 200, /, **context: Any) -> HTMLResponse:
    session: Session | None = getattr(request.state, "session", None)
    return templates.TemplateResponse(request, template, {
        "base": base(request), "me": session.me if session else None, "csrf": session.csrf if session else "",
        "error": None, **context}, status_code=status)


def refusal(request: Request, exc: ApiError | HubError, sent: Any = None) -> dict[str, Any]:
    """``error_view``, and the audit row for a refusal the console made itself (a ``HubError``: no API call
    was made, so no API audit row covers it). An ``ApiError`` is the API's answer, audited there."""
    view = error_view(exc, sent)
    if isinstance(exc, HubError):
        refused_call(request.scope, exc.code, exc.message)
    return view


def error_view(exc: ApiError | HubError, sent: Any = None) -> dict[str, Any]:
    """The hub's error as the page shows it: its code, message and the fields its details name, each with
    the value ``sent`` (the request's body) held there, unless it lies under one of ``SECRET_FIELDS``."""
    details = exc.details
    lines: list[str] = []
    if isinstance(details, list):
        for item in details:
            if isinstance(item, dict) and "msg" in item:
                loc = [p for p in item.get("loc", ()) if p != "body"]
                if any(str(p) in SECRET_FIELDS for p in loc):
                    value: Any = _MISSING
                else:
                    value = _without_secrets(item["input"] if "input" in item else _at(sent, loc))
                got = "" if value is _MISSING else f" (got {json.dumps(value, default=str)[:200]})"
                lines.append(f"{'.'.join(map(str, loc))}: {item['msg']}{got}")
    elif isinstance(details, dict):
        lines.extend(f"{k}: {v}" for k, v in details.items())
    # 0: no HTTP answer carried it (an operation waited for failed, the hub could not be reached).
    status = (exc.status or 502) if isinstance(exc, ApiError) else exc.status_code
    return {"status": status, "code": exc.code, "message": exc.message, "lines": lines}


_MISSING = object()


def _without_secrets(value: Any) -> Any:
    """``value`` with whatever lies under one of ``SECRET_FIELDS`` left out, at any depth."""
    if isinstance(value, Mapping):
        return {k: _without_secrets(v) for k, v in value.items() if str(k) not in SECRET_FIELDS}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


def _at(value: Any, loc: list[Any]) -> Any:
    for key in loc:
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            return _MISSING
    return value if loc else _MISSING


def see(request: Request, path: str, **query: str) -> RedirectResponse:
    """303 to another page of the console (after a change: a reload does not repeat it)."""
    suffix = f"?{urlencode(query)}" if query else ""
    return RedirectResponse(f"{base(request)}{path}{suffix}", status_code=303)


def confirmation(request: Request, form: FormData, message: str, back: str) -> HTMLResponse | None:
    """The confirmation page for a change sent without ``confirmed=yes``; None when confirmed."""
    if form.get("confirmed") == "yes":
        return None
    fields = [(k, v) for k, v in form.multi_items()
              if k not in (security.CSRF_FIELD, "confirmed") and isinstance(v, str)]
    return render(request, "confirm.html", message=message, action=request.url.path, fields=fields,
                  back=base(request) + back)


# ------------------------------------------------------------------ signing in


@router.get("/", response_model=None)
async def home(request: Request) -> Response:
    return see(request, "/services" if site(request).session_token(request) else "/login")


@router.get("/login", response_model=None)
async def login_page(request: Request, expired: bool = False) -> Response:
    return _login_form(request, expired=expired)


def _login_form(request: Request, status: int = 200, expired: bool = False, **context: Any) -> HTMLResponse:
    nonce = security.new_login_nonce()
    response = render(request, "login.html", status, login_csrf=nonce, expired=expired, **context)
    site(request).set_login_nonce(response, request, nonce, base(request))
    return response


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    form = await request.form()
    site(request).check_post(request, form.get(security.CSRF_FIELD), site(request).login_nonce(request) or "")
    token = str(form.get("token") or "").strip()
    if not token:
        refused = InvalidRequest("paste your API token", code="TOKEN_REQUIRED")
    elif not security.well_formed(token):
        refused = InvalidRequest(f"that is not an API token: one is printable ASCII without spaces, at most "
                                 f"{security.MAX_TOKEN} characters", code="TOKEN_MALFORMED")
    else:
        api = connect(request, token)
        try:
            await api.me()
        except ApiError as exc:
            # The API refused the token: its own audit row (GET /api/me) says so.
            view = error_view(exc)
            return _login_form(request, view["status"], error=view)
        finally:
            await api.aclose()
        response = see(request, "/services")
        site(request).set_session(response, request, token, base(request))
        return response
    view = refusal(request, refused)
    return _login_form(request, view["status"], error=view)


@router.post("/logout", response_model=None)
async def logout(request: Request) -> Response:
    """Drops the session's cookie, whatever the API would say of its token (revoked, the hub's database down):
    only the Origin and the form's CSRF token are checked. A cookie that holds no token is just dropped."""
    token = site(request).session_token(request)
    if token and security.well_formed(token):
        form = await request.form()
        site(request).check_post(request, form.get(security.CSRF_FIELD), security.csrf_token(token))
    response = see(request, "/login")
    site(request).clear_session(response, request, base(request))
    return response


# ------------------------------------------------------------------ services


@router.get("/services", response_model=None)
async def services_page(request: Request, s: SessionDep, name: str = "", owner: str = "",
                        done: str = "") -> Response:
    offset = _offset(request)
    services = await s.api.services.list(name=name or None, owner=owner or None, limit=PAGE, offset=offset,
                                         order="newest")
    return render(request, "services.html", services=services, name=name, owner=owner, done=done,
                  pages=_pages({"name": name, "owner": owner}, offset, len(services)))


async def _optional(call: Any) -> tuple[Any, dict[str, Any] | None]:
    """A part of a page that may fail on its own (a log of a service with no container yet)."""
    try:
        return await call, None
    except ApiError as exc:
        return None, error_view(exc)


# The charts' spans: (label, seconds shown, seconds per point).
WINDOWS = {"5m": (300, 5), "1h": (3600, 60), "6h": (6 * 3600, 300), "24h": (86400, 1200)}


async def _service_page(request: Request, s: Session, service_id: str, status: int = 200,
                        running: str = "", **context: Any) -> HTMLResponse:
    service = await s.api.services.get(service_id)
    window = request.query_params.get("window", "1h")
    span, resolution = WINDOWS.get(window, WINDOWS["1h"])
    since = datetime.now(UTC) - timedelta(seconds=span)
    (metrics, metrics_error), (logs, logs_error), history, operations, controllers = await asyncio.gather(
        _optional(s.api.services.metrics(service.id, since=since, resolution=resolution)),
        _optional(s.api.services.logs(service.id, tail=LOG_TAIL)),
        s.api.services.history(service.id),
        s.api.operations.list(service_id=service.id, limit=10),
        _optional(s.api.controllers.list()) if s.me.admin else _none(),
    )
    return render(request, "service.html", status, service=service, metrics=metrics, metrics_error=metrics_error,
                  charts=service_charts(metrics.points, max(since, utc(service.created_at)), datetime.now(UTC))
                  if metrics else [], logs=logs, logs_error=logs_error,
                  history=history, operations=operations,
                  controllers=controllers[0] or [] if s.me.admin else [],
                  labels=_pairs(service.spec.get("labels")), env=_pairs(service.spec.get("env")),
                  window=window if window in WINDOWS else "1h", windows=list(WINDOWS), running=running, **context)


async def _none() -> tuple[None, None]:
    return None, None


def _pairs(value: Any) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in value.items()] if isinstance(value, Mapping) else []


@router.get("/services/{service_id}", response_model=None)
async def service_page(request: Request, service_id: str, s: SessionDep, done: str = "",
                       running: str = "") -> Response:
    return await _service_page(request, s, service_id, done=done, running=running)


ACTIONS = {
    "start": None,
    "stop": "Stop {name}?",
    "restart": "Restart {name}?",
    "scale": "Scale {name} to {replicas} replicas?",
    "migrate": "Migrate {name} to {target}?",
    "rollback": "Roll {name} back to version {version}?",
    "delete": "Delete {name}? Its containers go; this cannot be undone.",
}


@router.post("/services/{service_id}/{action}", response_model=None)
async def service_action(request: Request, service_id: str, action: str, s: SessionDep, form: FormDep) -> Response:
    if action not in ACTIONS:
        return _no_action(request, action)
    question = ACTIONS[action]
    if question is not None:
        service = await s.api.services.get(service_id)
        values = {"name": service.name, "replicas": form.get("replicas", ""), "version": form.get("version", ""),
                  "target": form.get("target") or "another controller"}
        asked = confirmation(request, form, question.format(**values), f"/services/{service_id}")
        if asked is not None:
            return asked
    try:
        running = await _act(s, service_id, action, form)
    except (ApiError, HubError) as exc:
        view = refusal(request, exc)
        return await _service_page(request, s, service_id, view["status"], error=view)
    if action == "delete":
        return see(request, "/services", done=f"deleted {service_id}")
    if running is not None:
        return see(request, f"/services/{service_id}", running=f"{action} ({running.id})")
    return see(request, f"/services/{service_id}", done=action)


def _no_action(request: Request, action: str) -> HTMLResponse:
    refused_call(request.scope, "NOT_FOUND", f"no action {action!r}")
    return render(request, "error.html", 404, error={"status": 404, "code": "NOT_FOUND",
                                                     "message": f"no action {action!r}", "lines": []})


async def _act(s: Session, service_id: str, action: str, form: FormData) -> OperationOut | None:
    """Does ``action``; the operation it started if that is still running after ``WAIT_SECONDS``."""
    services = s.api.services
    started: list[OperationOut] = []
    if action == "delete":
        await services.delete(service_id)
    elif action == "scale":
        await services.scale(service_id, _whole(form, "replicas"), wait=False, progress=started.append)
    elif action == "migrate":
        await services.migrate(service_id, target=str(form.get("target") or "") or None, wait=False,
                               progress=started.append)
    elif action == "rollback":
        await services.rollback(service_id, _whole(form, "version"), wait=False, progress=started.append)
    else:
        await getattr(services, action)(service_id, wait=False, progress=started.append)
    return await settle(s.api, started)


async def settle(api: AsyncClient, started: list[OperationOut], timeout: float | None = None) -> OperationOut | None:
    """Waits at most ``timeout`` (``WAIT_SECONDS``) for the long operation a call sent without waiting handed
    to ``started.append`` (nothing there: the call had nothing to do). None once it succeeded; its
    ``ApiError`` if it failed; the operation itself if it is still running."""
    if not started:
        return None
    operation = started[-1]
    try:
        operation = await api.operations.wait(operation.id, timeout=WAIT_SECONDS if timeout is None else timeout)
    except ApiError as exc:
        if exc.code == "WAIT_TIMEOUT":
            return operation
        raise
    if operation.status != "succeeded":
        raise from_operation_error(operation.error, {"operation_id": operation.id, "operation": operation.operation})
    return None


def _whole(form: FormData, name: str) -> int:
    raw = str(form.get(name) or "").strip()
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number, not {raw!r}") from None


@router.get("/services/{service_id}/logs/follow", response_model=None)
async def follow_logs(request: Request, service_id: str, replica: str | None = None) -> Response:
    """The service's log as it is written, streamed as plain text for the page's script. Not through the SDK
    (an in-process transport holds a whole answer before it hands it on): the API's own handler, for the
    user the session's token admits, so tenancy and the caps on open streams are the API's."""
    token = site(request).session_token(request)
    if not token or not security.well_formed(token):
        refused_call(request.scope, "UNAUTHORIZED", "sign in again")
        return PlainTextResponse("UNAUTHORIZED: sign in again", status_code=401)
    hub = request.app.state.hub
    # ``admit`` reads the token where the API does, from an Authorization header: the session's, alone.
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
    scope = {**request.scope, "headers": [*headers, (b"authorization", f"Bearer {token}".encode())]}
    try:
        who = await admit(hub, scope)
        identify_call(request.scope, who.username)
        return await services_api.service_logs(service_id, as_user(who), hub, tail=0, follow=True, replica=replica)
    except HubError as exc:
        # The API's own refusal, made here in process: no API call's audit row covers it.
        refused_call(request.scope, exc.code, exc.message)
        return PlainTextResponse(f"{exc.code}: {exc.message}", status_code=exc.status_code)


# ------------------------------------------------------------------ deploying


@router.get("/deploy", response_model=None)
async def deploy_page(request: Request, s: SessionDep) -> Response:
    return await _deploy_form(request, s)


async def _deploy_form(request: Request, s: Session, status: int = 200, **context: Any) -> HTMLResponse:
    models, models_error = await _optional(s.api.models.list())
    fields = {"mode": "spec", "spec": "", "model": "", "name": "", "replicas": "1", "repo": "default",
              "owner": "", **context.pop("fields", {})}
    return render(request, "deploy.html", status, models=models or [], models_error=models_error, fields=fields,
                  **context)


@router.post("/deploy", response_model=None)
async def deploy(request: Request, s: SessionDep, form: FormDep) -> Response:
    fields = {k: str(v) for k, v in form.items() if isinstance(v, str) and k != security.CSRF_FIELD}
    spec: dict[str, Any] = {}
    started: list[OperationOut] = []
    try:
        spec = _spec_of(fields)
        created = await s.api.services.create(spec, owner=fields.get("owner") or None,
                                              repo=fields.get("repo") or "default", wait=False,
                                              progress=started.append)
        running = await settle(s.api, started)
    except (ApiError, HubError) as exc:
        view = refusal(request, exc, spec)
        shown = _without_password(fields, spec)
        if shown is not fields:
            view["lines"].append("registry_auth.password and secrets' values: not shown again; type them again")
        return await _deploy_form(request, s, view["status"], fields=shown, error=view)
    if running is not None:
        return see(request, f"/services/{created.id}", running=f"deploy ({running.id})")
    return see(request, f"/services/{created.id}", done="deployed")


def _without_password(fields: dict[str, str], spec: dict[str, Any]) -> dict[str, str]:
    """The deploy form shown again after a refusal, without the registry password or the secrets' values it
    was sent with (the hub never shows them back either): the spec re-written with those empty, or, when the
    text could not be read as a spec, no text at all. ``fields`` itself when there were none."""
    sent = fields.get("spec", "")
    if fields.get("mode") == "model" or ("registry_auth" not in sent and "secrets" not in sent):
        return fields
    text = ""
    if spec:
        kept = dict(spec)
        if "registry_auth" in spec:
            auth = spec["registry_auth"]
            user = auth.get("username") if isinstance(auth, Mapping) else None
            kept["registry_auth"] = {"username": user if isinstance(user, str) else "", "password": ""}
        if "secrets" in spec:
            given = spec["secrets"]
            kept["secrets"] = {str(name): "" for name in given} if isinstance(given, Mapping) else {}
        text = yaml.safe_dump(kept, sort_keys=False, allow_unicode=True)
    return {**fields, "spec": text}


def _spec_of(fields: Mapping[str, str]) -> dict[str, Any]:
    """The spec the form describes: its text (YAML, of which JSON is a part), or a model type's name with a
    service name and a number of replicas. Only the text's syntax is checked here; the spec is the API's to judge."""
    if fields.get("mode") == "model":
        spec: dict[str, Any] = {"model": fields.get("model", ""), "name": fields.get("name", "")}
        raw = fields.get("replicas", "").strip()
        if raw:
            try:
                spec["replicas"] = int(raw)
            except ValueError:
                spec["replicas"] = raw  # the API's validation names it
        return spec
    try:
        spec = yaml.safe_load(fields.get("spec", ""))
    except yaml.YAMLError as exc:
        # The problem and where, not the parser's quote of the text (which may hold a password).
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InvalidRequest(f"the spec is neither YAML nor JSON: {getattr(exc, 'problem', None) or 'unreadable'}"
                             f"{where}", code="INVALID_SPEC_TEXT") from None
    if not isinstance(spec, dict):
        raise InvalidRequest("the spec must be a mapping of fields (YAML or JSON)", code="INVALID_SPEC_TEXT")
    return spec


# ------------------------------------------------------------------ controllers


@router.get("/controllers", response_model=None)
async def controllers_page(request: Request, s: SessionDep, done: str = "") -> Response:
    return render(request, "controllers.html", controllers=await s.api.controllers.list(), done=done)


CONTROLLER_ACTIONS = {
    "enable": None,
    "disable": "Disable {id}? Nothing new is placed on it; what runs there stays.",
    "drain": "Drain {id}? Every service on it moves to other controllers.",
}


@router.post("/controllers/{controller_id}/{action}", response_model=None)
async def controller_action(request: Request, controller_id: str, action: str, s: SessionDep,
                            form: FormDep) -> Response:
    if action not in CONTROLLER_ACTIONS:
        return _no_action(request, action)
    question = CONTROLLER_ACTIONS[action]
    if question is not None:
        asked = confirmation(request, form, question.format(id=controller_id), "/controllers")
        if asked is not None:
            return asked
    try:
        if action == "drain":
            started: list[OperationOut] = []
            await s.api.controllers.drain(controller_id, wait=False, progress=started.append)
            running = await settle(s.api, started)
            if running is not None:
                return see(request, "/operations", controller_id=controller_id, operation="drain",
                           running=f"drain ({running.id})")
        else:
            await getattr(s.api.controllers, action)(controller_id)
    except ApiError as exc:
        controllers, _ = await _optional(s.api.controllers.list())
        view = error_view(exc)
        return render(request, "controllers.html", view["status"], controllers=controllers or [], done="",
                      error=view)
    return see(request, "/controllers", done=f"{action} {controller_id}")


# ------------------------------------------------------------------ operations, audit, alerts

OPERATION_FILTERS = ("service_id", "controller_id", "status", "operation")
AUDIT_FILTERS = ("actor", "result", "source", "method", "since", "target")


def _filters(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    return {n: request.query_params.get(n, "").strip() for n in names}


def _offset(request: Request) -> int:
    raw = request.query_params.get("offset", "0")
    return int(raw) if raw.isdigit() else 0


@router.get("/operations", response_model=None)
async def operations_page(request: Request, s: SessionDep) -> Response:
    filters = _filters(request, OPERATION_FILTERS)
    offset = _offset(request)
    operations = await s.api.operations.list(**{k: v or None for k, v in filters.items()}, limit=PAGE,
                                             offset=offset)
    return render(request, "operations.html", operations=operations, filters=filters,
                  pages=_pages(filters, offset, len(operations)), running=request.query_params.get("running", ""))


@router.get("/audit", response_model=None)
async def audit_page(request: Request, s: SessionDep) -> Response:
    filters = _filters(request, AUDIT_FILTERS)
    offset = _offset(request)
    query: dict[str, Any] = {k: v or None for k, v in filters.items()}
    if filters["since"]:
        try:
            query["since"] = datetime.fromisoformat(filters["since"])
        except ValueError:
            raise InvalidRequest(f"since must be a time in ISO 8601 (2026-12-07T10:00), not {filters['since']!r}") \
                from None
    entries = await s.api.audit.list(**query, limit=PAGE, offset=offset)
    return render(request, "audit.html", entries=entries, filters=filters, pages=_pages(filters, offset, len(entries)))


def _pages(filters: Mapping[str, str], offset: int, shown: int) -> dict[str, str | None]:
    kept = {k: v for k, v in filters.items() if v}
    return {
        "previous": urlencode({**kept, "offset": max(0, offset - PAGE)}) if offset > 0 else None,
        "next": urlencode({**kept, "offset": offset + PAGE}) if shown == PAGE else None,
    }


@router.get("/alerts", response_model=None)
async def alerts_page(request: Request, s: SessionDep) -> Response:
    offset = _offset(request)
    alerts = await s.api.alerts.list(limit=PAGE, offset=offset)
    return render(request, "alerts.html", alerts=alerts, pages=_pages({}, offset, len(alerts)))


# ------------------------------------------------------------------ jobs

JOB_FILTERS = ("status", "name")


@router.get("/jobs", response_model=None)
async def jobs_page(request: Request, s: SessionDep, done: str = "") -> Response:
    filters = _filters(request, JOB_FILTERS)
    offset = _offset(request)
    jobs = await s.api.jobs.list(status=filters["status"] or None, name=filters["name"] or None, limit=PAGE,
                                 offset=offset)
    return render(request, "jobs.html", jobs=jobs, filters=filters, done=done,
                  pages=_pages(filters, offset, len(jobs)))


async def _job_page(request: Request, s: Session, job_id: str, status: int = 200, **context: Any) -> HTMLResponse:
    job = await s.api.jobs.get(job_id)
    (logs, logs_error), (artifacts, artifacts_error) = await asyncio.gather(
        _optional(s.api.jobs.logs(job.id, tail=LOG_TAIL)) if job.attempts else _none(),
        _optional(s.api.jobs.artifacts(job.id)) if job.status in JOB_FINAL else _none())
    return render(request, "job.html", status, job=job, logs=logs, logs_error=logs_error, artifacts=artifacts or [],
                  artifacts_error=artifacts_error, final=job.status in JOB_FINAL,
                  command=" ".join(map(str, [*job.spec.get("command", []), *job.spec.get("args", [])])),
                  **{"done": "", **context})


@router.get("/jobs/{job_id}", response_model=None)
async def job_page(request: Request, job_id: str, s: SessionDep, done: str = "") -> Response:
    """A job: its status and why it waits, its progress, its attempts, its log's tail and its outputs."""
    return await _job_page(request, s, job_id, done=done)


@router.post("/jobs/{job_id}/cancel", response_model=None)
async def job_cancel(request: Request, job_id: str, s: SessionDep, form: FormDep) -> Response:
    asked = confirmation(request, form, f"Cancel job {job_id}? Its container is stopped.", f"/jobs/{job_id}")
    if asked is not None:
        return asked
    try:
        job = await s.api.jobs.cancel(job_id)
    except ApiError as exc:
        view = error_view(exc)
        return await _job_page(request, s, job_id, view["status"], error=view)
    return see(request, f"/jobs/{job.id}", done="cancelled")
