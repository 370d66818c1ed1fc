"""What every client command shares: its options (``--profile``, ``--json``), the SDK client it speaks
through, how it shows a result (``show``: JSON, or a table), the one-line errors it exits with, and the
progress bar of a long operation.

Invariant: a client command never shows a traceback for what the hub or the network did. Every
``ApiError`` (``HUB_UNREACHABLE`` included) ends as one line ``error: CODE: message`` on stderr and exit
status 1; a usage problem (a file that cannot be read, a refused confirmation) exits with 2; Ctrl-C exits
with 130, saying which operation goes on without the command when it was waiting for one. The SDK is
imported when a command runs, never when ``mmanager`` starts: the server commands do not pay for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from mmanager.commands import render
from mmanager.commands.render import escape

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from mmanager.client import Client

Profile = Annotated[str | None, typer.Option(
    "--profile", "-p", envvar="MMANAGER_PROFILE", show_envvar=False,
    help="the login profile to use (default: MMANAGER_PROFILE, else the config's current one); a profile "
         "named keeps its own URL and token unless MMANAGER_HUB_URL and MMANAGER_TOKEN are both set")]
Json = Annotated[bool, typer.Option("--json", help="print the API's JSON instead of tables")]

USAGE = 2
FAILED = 1
INTERRUPTED = 130

# The long operation this command waits for: whether it asked for one, and the id its progress callback last
# saw (what Ctrl-C leaves running on the hub).
_waiting: dict[str, Any] = {"asked": False, "operation": None}


def stdout(json: bool = False) -> Console:
    """The console results go to: no colour and no wrapping when stdout is not a terminal (a pipe, a file),
    so that every row of a table stays one line for grep."""
    terminal = sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=not terminal, width=None if terminal else 100_000,
                   no_color=json or not terminal)


def show(json_out: bool, value: Any, view: Callable[[Console, Any], None]) -> None:
    """A command's result: its JSON (``--json``), or drawn by ``view`` (a ``render`` function)."""
    if json_out:
        render.print_json(value)
    else:
        view(stdout(), value)


def fail(code: str, message: str, status: int = FAILED) -> NoReturn:
    """One line on stderr, ``error: CODE: message``, and exit ``status``."""
    Console(stderr=True, highlight=False).print(f"[red]error:[/red] {escape(code)}: {escape(message)}",
                                                soft_wrap=True)
    raise typer.Exit(status)


def note(message: str) -> None:
    """A line for the person, not the result: on stderr, so that stdout stays the result alone."""
    Console(stderr=True, highlight=False).print(message, soft_wrap=True)


@contextmanager
def api_errors() -> Iterator[None]:
    """Turns the SDK's errors into the one-line exit; Ctrl-C into exit status 130, with a line naming the
    operation that goes on on the hub when the command was waiting for one (quietly otherwise)."""
    from mmanager.client import ApiError

    _waiting.update(asked=False, operation=None)
    try:
        yield
    except ApiError as exc:
        fail(exc.code, exc.message)
    except KeyboardInterrupt:
        interrupted()
        raise typer.Exit(INTERRUPTED) from None


def interrupted() -> None:
    """What Ctrl-C leaves behind: the hub carries an operation on without the command that waited for it."""
    found = _waiting["operation"]
    if found:
        note(f"interrupted; operation {escape(found)} continues on the hub: mmanager operations wait {escape(found)}")
    elif _waiting["asked"]:
        note("interrupted; what was asked may still go on on the hub: mmanager operations list")


def make_client(profile: str | None) -> Client:
    """The SDK client of a command: ``profile`` and the environment (MMANAGER_HUB_URL, MMANAGER_TOKEN) as
    ``mmanager.client.config.resolve`` decides (a profile's token never goes to another hub, nor another
    hub's token to a profile named)."""
    from mmanager.client import Client

    return Client(profile=profile)


@contextmanager
def connect(profile: str | None) -> Iterator[Client]:
    """A client for the length of one command, its errors turned into the one-line exit."""
    with api_errors(), make_client(profile) as client:
        yield client


def completions(ctx: typer.Context, incomplete: str, names: Callable[[Client], list[str]]) -> list[str]:
    """Shell completion's candidates from the hub (``names(client)``), for the command's ``--profile``:
    none, quietly, when the hub cannot say (not logged in, unreachable, slow): a completion never prints an
    error into the user's command line."""
    from mmanager.client import Client

    try:
        with Client(profile=ctx.params.get("profile"), timeout=3.0) as client:
            return [name for name in names(client) if name.startswith(incomplete)]
    except Exception:
        return []


def progress_fields(op: Any) -> dict[str, Any]:
    """How a running operation (an ``OperationOut``) shows on a progress bar: its ``details.progress``
    ``{done, total, unit, step}`` as the bar's fields; an operation that has reported none yet shows its
    name and status, with no total (an indeterminate bar)."""
    found = (op.details or {}).get("progress") if isinstance(op.details, dict) else None
    if not isinstance(found, dict):
        return {"description": f"{op.operation} {op.status}", "total": None, "completed": 0, "unit": ""}
    total, done = counted(found.get("total")), counted(found.get("done"))
    step = found.get("step") or op.status
    # A total of 0 (nothing to count yet) is no total: the bar stays indeterminate rather than divide by it.
    return {"description": f"{op.operation}: {step}", "total": total or None, "completed": done,
            "unit": str(found.get("unit") or "")}


def counted(value: Any) -> float:
    """A progress count as the hub reported it, or 0 for what is not a count (missing, negative, text)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else 0


def amount(done: float, total: float | None, unit: str) -> str:
    """``12.5/40.0 MB``, ``1/3 replicas``: what a bar's count reads; nothing before the first progress."""
    if not total and not done and not unit:
        return ""
    if unit == "bytes":
        from rich.filesize import decimal

        return f"{decimal(int(done))}/{decimal(int(total))}" if total else decimal(int(done))
    shown = f"{int(done)}/{int(total)}" if total else str(int(done))
    return f"{shown} {unit}".rstrip()


@contextmanager
def progress_bar(json: bool, label: str) -> Iterator[Callable[[Any], None]]:
    """The SDK's ``progress`` callback: it keeps the id of the operation (for Ctrl-C's line, ``interrupted``)
    and draws a bar on a terminal; no bar with ``--json`` or when stdout is not a terminal. The bar goes once
    the operation ends; the command prints the result."""
    _waiting.update(asked=True, operation=None)

    def seen(op: Any) -> None:
        _waiting["operation"] = getattr(op, "id", None) or _waiting["operation"]

    try:
        if json or not sys.stdout.isatty():
            yield seen
        else:
            with _drawn(label, seen) as update:
                yield update
    except KeyboardInterrupt:
        raise  # what it saw stays for interrupted()
    except BaseException:
        _waiting.update(asked=False, operation=None)
        raise
    # Ended (or failed): what it waited for is over.
    _waiting.update(asked=False, operation=None)


@contextmanager
def _drawn(label: str, seen: Callable[[Any], None]) -> Iterator[Callable[[Any], None]]:
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Amount(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(amount(task.completed, task.total, task.fields.get("unit", "")), style="progress.download")

    bar: Progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), Amount(),
                             TimeElapsedColumn(), console=stdout(), transient=True)
    task: TaskID = bar.add_task(escape(label), total=None, unit="")

    def update(op: Any) -> None:
        seen(op)
        fields = progress_fields(op)
        bar.update(task, description=escape(fields["description"]), total=fields["total"],
                   completed=fields["completed"], unit=fields["unit"])

    with bar:
        yield update
