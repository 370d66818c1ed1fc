"""The ``mmanager`` command."""

from __future__ import annotations

# First, before the imports that take a moment: Ctrl-C while they run exits quietly (mmanager.interrupt).
from mmanager import interrupt

# isort: split
import asyncio
import base64
import contextlib
import gc
import getpass
import json
import logging
import secrets
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from rich.console import Console

from mmanager.commands import attach as attach_client_commands
from mmanager.serving import Server, serve

app = typer.Typer(help="mManager hub: orchestrate model-service containers across a lab's servers.",
                  no_args_is_help=True)
hub_app = typer.Typer(help="The central hub.", no_args_is_help=True)
controller_app = typer.Typer(help="The per-server controller agent.", no_args_is_help=True)
gateway_app = typer.Typer(help="The gateway: HAProxy configured from the hub's routing table.", no_args_is_help=True)
db_app = typer.Typer(help="The hub's database: schema, backup and restore.", no_args_is_help=True)
users_app = typer.Typer(help="Users over the hub's API (list, show, disable, enable, delete, quota; admin), and "
                                "create straight on the hub's database (on the hub host).", no_args_is_help=True)
hub_key_app = typer.Typer(help="The hub key that seals stored secrets (MMANAGER_HUB_KEY).", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
app.add_typer(controller_app, name="controller")
app.add_typer(gateway_app, name="gateway")
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(hub_key_app, name="hub-key")
controllers_app = typer.Typer(help="Controllers over the hub's API (list, show, enable, disable, drain), and their "
                                   "heartbeat keys straight on the hub's database (key-*, on the hub host).",
                              no_args_is_help=True)
app.add_typer(controllers_app, name="controllers")
models_app = typer.Typer(help="The model catalog over the hub's API (list, show), the model-file store (files), "
                              "and register straight on the hub's database (on the hub host).", no_args_is_help=True)
app.add_typer(models_app, name="models")
# The client commands (login, apply, services, ...): docs/CLI.md.
attach_client_commands(app, controllers_app, models_app, users_app)

console = Console(stderr=True)
T = TypeVar("T")

# The cyclic collector's thresholds for a hub process (Python's own: 700, 10, 10). See _server_gc.
HUB_GC_THRESHOLDS = (20_000, 20, 20)


def _server_gc() -> None:
    """Set the collector up for a long-running hub: what is loaded by now (modules, classes, schemas: about
    200,000 objects) is frozen out of every later collection, and collections come less often. With Python's
    defaults a hub under heavy heartbeat load spends much of its time in the collector, and each full
    collection pauses every request waiting. Only cycles wait longer to be freed; everything else is freed
    by reference counting as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*HUB_GC_THRESHOLDS)
Host = Annotated[str, typer.Option(help="address to listen on")]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _problems(exc: Any) -> str:
    """A settings ``ValidationError`` as one line: each problem after the variable it is about, if any."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else str(e["msg"])
                     for e in exc.errors())


def _setup_logs(settings: Any) -> None:
    """LOG_LEVEL, LOG_FILE and LOG_FORMAT (``mmanager.logs``); a LOG_FILE that cannot be opened stops here."""
    from mmanager.logs import LogFileError, setup_logging

    try:
        setup_logging(settings)
    except LogFileError as exc:
        _fail(str(exc))


@hub_app.command("serve")
def hub_serve(host: Host = "0.0.0.0", port: int = 8000,
              migrate: Annotated[bool, typer.Option(help="run the migrations first")] = True) -> None:
    """Run the hub."""
    from pydantic import ValidationError

    from hub.app import create_app
    from hub.config import HubSettings
    from hub.migrate import upgrade

    try:
        settings = HubSettings()
    except ValidationError as exc:
        _fail("hub settings: " + _problems(exc))
        return
    _setup_logs(settings)
    if migrate:
        upgrade(settings.database_url)
    # No log_config and no log_level: uvicorn's error and access logs go through the handler just set up.
    app = create_app(settings)
    _server_gc()
    serve(app, app.state.hub.presence.close, host=host, port=port, log_config=None, **settings.tls.server_options())


@controller_app.command("serve")
def controller_serve(host: Host = "0.0.0.0", port: Annotated[int | None, typer.Option(
        help="port (default: PORT / MMANAGER_PORT, else 8001)")] = None) -> None:
    """Run a controller on this host, driving its Docker daemon."""
    from pydantic import ValidationError

    from controller.app import run
    from controller.config import ControllerSettings
    from mmanager.logs import LogFileError

    try:
        settings = ControllerSettings()
    except ValidationError as exc:
        _fail("controller settings: " + _problems(exc))
        return
    try:
        run(settings, host=host, port=port)
    except LogFileError as exc:
        _fail(str(exc))


@gateway_app.command("serve")
def gateway_serve(
        host: Annotated[str | None, typer.Option(help="address to listen on (default 0.0.0.0)")] = None,
        port: Annotated[int | None, typer.Option(help="port the services are served on (default 8080)")] = None,
        advertise_url: Annotated[str | None, typer.Option(
            help="the URL clients reach this gateway by (default http://{host}:{port}, 0.0.0.0 as the hostname)")] = None,
        metrics_port: Annotated[int | None, typer.Option(help="HAProxy's /metrics and /healthz (default port + 1)")] = None,
        state_dir: Annotated[Path | None, typer.Option(
            help="haproxy.cfg, its maps and sockets (default /var/lib/mmanager/gateway)")] = None,
        id: Annotated[str | None, typer.Option("--id", help="this gateway's id on the hub (default hostname-port)")] = None,
        poll: Annotated[float | None, typer.Option(help="seconds between polls of the routing table (default 0.5)")] = None,
) -> None:
    """Run a gateway: a HAProxy that serves the hub's services, following its routing table.
    Settings: MMANAGER_HUB_URL, MMANAGER_API_KEY and MMANAGER_GATEWAY_* (the options win)."""
    from pydantic import ValidationError

    from gateway.agent import serve
    from gateway.haproxy import HAProxyError
    from gateway.settings import GatewaySettings

    given = {"MMANAGER_GATEWAY_HOST": host, "MMANAGER_GATEWAY_PORT": port,
             "MMANAGER_GATEWAY_ADVERTISE_URL": advertise_url, "MMANAGER_GATEWAY_METRICS_PORT": metrics_port,
             "MMANAGER_GATEWAY_STATE_DIR": state_dir, "MMANAGER_GATEWAY_ID": id, "MMANAGER_GATEWAY_POLL": poll}
    try:
        settings = GatewaySettings(**{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        _fail("gateway settings: " + _problems(exc))
        return
    if shutil.which(settings.haproxy) is None:
        _fail(f"{settings.haproxy} not found: install HAProxy 2.6+ (Debian: apt-get install haproxy)")
    _setup_logs(settings)
    try:
        asyncio.run(serve(settings))
    except HAProxyError as exc:
        _fail(str(exc))


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations to MMANAGER_DATABASE_URL."""
    from hub.config import DatabaseSettings
    from hub.migrate import upgrade

    upgrade(DatabaseSettings().database_url, revision)
    console.print(f"database at revision {revision}")


@db_app.command("backup")
def db_backup(file: Annotated[Path, typer.Argument(help="the dump to write (pg_dump's custom format)")]) -> None:
    """Dump MMANAGER_DATABASE_URL into FILE (pg_dump -Fc; the hubs may keep running)."""
    from hub import backup
    from hub.config import DatabaseSettings

    try:
        backup.backup(DatabaseSettings().database_url, file)
    except backup.BackupError as exc:
        _fail(str(exc))
    console.print(f"database backed up to {file}")


@db_app.command("restore")
def db_restore(file: Annotated[Path, typer.Argument(help="a dump of `mmanager db backup`")],
               force: Annotated[bool, typer.Option(
                   "--force", help="restore even though hub replicas seem to run on the database")] = False) -> None:
    """Replace MMANAGER_DATABASE_URL's content with FILE's, then migrate it to head. Stop every hub first."""
    from hub import backup
    from hub.config import DatabaseSettings

    try:
        backup.restore(DatabaseSettings().database_url, file, force=force)
    except backup.BackupError as exc:
        _fail(str(exc))
    console.print(f"database restored from {file}; start the hubs again")


@users_app.command("create")
def users_create(name: str, admin: Annotated[bool, typer.Option("--admin", help="may use /api/admin")] = False) -> None:
    """Create a user and print its API token (shown once)."""
    from hub.services.users import create_user

    _, token = _on_database(lambda session: create_user(session, name, admin))
    console.print(f"created {'admin ' if admin else ''}user {name}; its token is shown once:")
    print(token)


@hub_key_app.command("rotate")
def hub_key_rotate() -> None:
    """Seal every stored secret again under MMANAGER_HUB_KEY, opening what the previous key sealed with
    MMANAGER_HUB_KEY_PREVIOUS (docs/OPERATIONS.md, Rotating the hub key). Exits 1 if any value did not open."""
    from pydantic import ValidationError

    from hub.config import HubKeySettings
    from hub.migrate import on_migrated
    from hub.services.hub_key import rotate

    try:
        settings = HubKeySettings()
    except ValidationError as exc:
        _fail(f"the hub key settings: {_problems(exc)}")
    sealer = settings.sealer
    if sealer is None:
        _fail("MMANAGER_HUB_KEY (or MMANAGER_HUB_KEY_FILE) is not set: it names the key to seal under")
    assert sealer is not None
    done = on_migrated(settings.database_url, lambda session: rotate(session, sealer))
    console.print(f"hub key {done.key_id}: {done.resealed} sealed value(s) sealed again, {done.current} already "
                  "under it")
    if done.failed:
        console.print(f"[red]{len(done.failed)} value(s) did not open[/red] (sealed under a key that is neither "
                      "MMANAGER_HUB_KEY nor in MMANAGER_HUB_KEY_PREVIOUS, or damaged); left as they are:")
        for where in done.failed:
            console.print(f"  {where}")
        raise typer.Exit(1)


def _on_database(work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(session)`` in one transaction on MMANAGER_DATABASE_URL (migrated first)."""
    from hub.config import DatabaseSettings
    from hub.errors import HubError
    from hub.migrate import on_migrated

    try:
        return on_migrated(DatabaseSettings().database_url, work)
    except HubError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from None


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return "cli"


@controllers_app.command("key-create")
def controllers_key_create(controller_id: str) -> None:
    """Mint a heartbeat key for a registered controller and print it (shown once) on the last line."""
    from hub.services.controller_keys import create_key

    async def work(session: Any) -> tuple[Any, str]:
        return await create_key(session, controller_id, created_by=_operator())

    row, key = _on_database(work)
    console.print(f"created key {row.id} ({row.prefix}…) for controller {controller_id}; it is shown once.")
    console.print("Put it in the controller's MMANAGER_CONTROLLER_KEY_FILE (or MMANAGER_CONTROLLER_KEY):")
    print(key)


@controllers_app.command("key-list")
def controllers_key_list(controller_id: str) -> None:
    """List a controller's keys (never the keys themselves)."""
    from hub.services.controller_keys import list_keys

    rows = _on_database(lambda session: list_keys(session, controller_id))
    print("ID\tPREFIX\tCREATED\tLAST USED\tREVOKED\tCREATED BY")
    for k in rows:
        print("\t".join([k.id, k.prefix, k.created_at.isoformat(timespec="seconds"),
                         k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "-",
                         k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-", k.created_by]))


@controllers_app.command("key-revoke")
def controllers_key_revoke(controller_id: str, key_id: str) -> None:
    """Revoke a controller's key: heartbeats with it are refused at once."""
    from hub.services.controller_keys import revoke_key

    row = _on_database(lambda session: revoke_key(session, controller_id, key_id))
    console.print(f"key {row.id} ({row.prefix}…) of controller {controller_id} is revoked")


@models_app.command("register")
def models_register(file: Annotated[Path, typer.Option("--file", "-f", help="a JSON list of model types "
                                                       "(modelserver/catalog.json's shape), or one type")]) -> None:
    """Create or replace each model type of FILE, all or none, under the spec policy of this environment."""
    from pydantic import TypeAdapter, ValidationError

    from hub.schemas import ModelTypeIn
    from hub.services.catalog import register
    from mmanager.settings import SpecPolicySettings

    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        _fail(f"{file}: {exc}")
        return
    try:
        bodies = TypeAdapter(list[ModelTypeIn]).validate_python(raw if isinstance(raw, list) else [raw])
    except ValidationError as exc:
        _fail(f"{file}: {_problems(exc)}")
        return
    policy = SpecPolicySettings().spec_policy
    for name, created in _on_database(lambda session: register(session, bodies, policy)):
        console.print(f"{'created' if created else 'replaced'} model type {name}")


def _free_port(port: int) -> bool:
    with socket.socket() as s:
        # As uvicorn will: connections of an earlier run in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class _SharedLoopServer(Server):
    """A uvicorn server that leaves signals to its caller: two of them share one loop in dev mode."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@app.command("dev")
def dev(port: int = 8000,
        state_dir: Annotated[Path, typer.Option(help="where the dev database and token live")] = Path(".mmanager"),
        controller_port: Annotated[int | None, typer.Option(help="default: port + 1")] = None,
        gateway_port: Annotated[int | None, typer.Option(
            help="the gateway's (its metrics on the next port); default: port + 2; 0: no gateway")] = None) -> None:
    """All-in-one: the hub on embedded SQLite, one local controller and a gateway (HAProxy, when installed),
    like `nomad agent -dev`."""
    from pydantic import SecretStr

    from controller.app import create_app as create_controller
    from controller.config import ControllerSettings
    from hub.app import create_app as create_hub
    from hub.config import HubSettings
    from hub.db import Database
    from hub.migrate import upgrade
    from hub.services.users import ensure_user, issue_token
    from mmanager.logs import LogSettings

    _setup_logs(LogSettings())
    ctl_port = controller_port or port + 1
    gw_port = port + 2 if gateway_port is None else gateway_port
    if gw_port and shutil.which("haproxy") is None:
        console.print("[yellow]no gateway[/yellow]: haproxy is not installed (Debian: apt-get install haproxy); "
                      "services are reached at their containers' ports")
        gw_port = 0
    for p in (port, ctl_port, *((gw_port, gw_port + 1) if gw_port else ())):
        if not _free_port(p):
            _fail(f"port {p} is in use; pick others with --port / --controller-port / --gateway-port")
    state_dir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite+aiosqlite:///{(state_dir / 'dev.db').resolve()}"
    upgrade(db_url)
    key = secrets.token_hex(32)  # lives only as long as this process
    controller_id = f"dev-{socket.gethostname()}"
    controller_url = f"http://127.0.0.1:{ctl_port}"
    ctl_settings = ControllerSettings(
        MMANAGER_API_KEY=key, SERVER_ID=controller_id, SERVER_TYPE="cpu", CONTROLLER_URL=controller_url,
        PUBLISH_IP="127.0.0.1", MMANAGER_HUB_URL=f"http://127.0.0.1:{port}", MMANAGER_DEV=True,
        MMANAGER_JOB_DIR=(state_dir / "jobs").resolve(),
    )
    # The hub key stays with the database it seals registry credentials in (MMANAGER_HUB_KEY_FILE).
    hub_key_file = state_dir / "hub-key"
    if not hub_key_file.exists():
        hub_key_file.touch(mode=0o600)
        hub_key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    hub_settings = HubSettings(
        database_url=db_url, api_key=SecretStr(key), dev_mode=True, hub_key_file=hub_key_file.resolve(),
        controllers=json.dumps([{"id": controller_id, "url": controller_url, "server_type": "cpu"}]),
    )
    gw_settings = None
    if gw_port:
        from gateway.settings import GatewaySettings
        gw_settings = GatewaySettings(
            hub_url=f"http://127.0.0.1:{port}", api_key=SecretStr(key), host="127.0.0.1", port=gw_port,
            state_dir=(state_dir / "gateway").resolve(), id="dev-gateway", poll=0.2)

    async def bootstrap() -> str:
        db = Database(db_url)
        try:
            async with db.session() as session:
                user = await ensure_user(session, "dev", is_admin=True)
                return await issue_token(session, user)
        finally:
            await db.dispose()

    token = asyncio.run(bootstrap())
    _server_gc()
    token_file = state_dir / "dev-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    async def serve() -> None:
        # As uvicorn's log_level below quiets its own loggers: no access line for every call in this terminal.
        logging.getLogger("mmanager.access").setLevel(logging.WARNING)
        ctl_app = create_controller(ctl_settings)
        ctl = _SharedLoopServer(uvicorn.Config(ctl_app, host="127.0.0.1", port=ctl_port, log_config=None,
                                               log_level="warning"), closing=ctl_app.state.jobs.closing)
        hub_app = create_hub(hub_settings)
        hub = _SharedLoopServer(uvicorn.Config(hub_app, host="127.0.0.1", port=port, log_config=None,
                                               log_level="warning"), closing=hub_app.state.hub.presence.close)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(hub, "should_exit", True))
        ctl_task = asyncio.create_task(ctl.serve())
        while not ctl.started and not ctl_task.done():
            await asyncio.sleep(0.05)
        hub_task = asyncio.create_task(hub.serve())
        while not hub.started and not hub_task.done():
            await asyncio.sleep(0.05)
        gateway = None
        if hub.started and gw_settings is not None:
            from gateway.agent import GatewayAgent
            gateway = GatewayAgent(gw_settings)
            await gateway.open()
            gateway.start()
        if hub.started:
            console.print(f"[green]mManager dev[/green]: hub http://127.0.0.1:{port}  controller {controller_url}"
                          + (f"  gateway http://127.0.0.1:{gw_port}" if gateway else ""))
            console.print(f"admin user 'dev', token in {token_file}:\n  export MMANAGER_TOKEN={token}")
        try:
            await hub_task
        finally:
            if gateway is not None:
                await gateway.close()
            # The hub goes first so it never calls a controller that is already gone.
            ctl.should_exit = True
            await ctl_task

    asyncio.run(serve())


# The commands take Ctrl-C themselves from here on.
interrupt.restore()

if __name__ == "__main__":
    # As the installed script is called, so that shell completion's variable is _MMANAGER_COMPLETE either way.
    app(prog_name="mmanager")
