"""``mmanager pipelines submit|list|show|cancel|retry|watch``: pipelines (DAGs of jobs submitted as one spec)
over the hub's API, named by id or by the name of one of the user's own (the newest of that name).

Invariant: each command is the SDK's calls; ``watch`` and ``submit --wait`` draw a live table of the steps
(a progress line per running step) on a terminal only, print the pipeline once it ends, and exit 0 only
for a pipeline that succeeded (else ``error: PIPELINE_<STATUS>: …``, exit 1); Ctrl-C leaves it running.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmanager.commands import render
from mmanager.commands.jobs import Rates, SpecFile, left_running, read_spec
from mmanager.commands.render import escape
from mmanager.commands.session import Json, Profile, completions, connect, fail, show, stdout

if TYPE_CHECKING:
    from hub.job_schemas import PipelineOut

app = typer.Typer(help="Pipelines: jobs that pass artifacts to each other, submitted, followed, cancelled and "
                       "retried as one.", no_args_is_help=True)


def _own_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return completions(ctx, incomplete, lambda c: sorted({p.name for p in c.pipelines.list(owner=c.me().username,
                                                                                            limit=1000)}))


Ref = Annotated[str, typer.Argument(help="the pipeline: its id, or the name of one of yours (the newest)",
                                    show_default=False, autocompletion=_own_names)]


def _said(p: PipelineOut, what: str = "") -> None:
    stdout().print(f"[bold]{escape(p.name)}[/bold]: {escape(what) + '; ' if what else ''}"
                   f"{render.styled(p.status, render.JOB_STATUS).markup}, steps {render.steps_done(p)} succeeded"
                   f" (pipeline {p.id})")


@contextmanager
def live_steps(json_out: bool) -> Iterator[Callable[[Any], None]]:
    """The SDK's ``progress`` for a pipeline: a live table of its steps on a terminal; nothing otherwise."""
    if json_out or not sys.stdout.isatty():
        yield lambda p: None
        return
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    rates = Rates()
    live = Live(console=stdout(), transient=True, auto_refresh=False)

    def update(p: Any) -> None:
        measured = {s.id: r for s in p.steps if (r := rates.of(s)) is not None}
        head = Text.assemble(render.text(p.name, "bold"), " ", render.styled(p.status, render.JOB_STATUS),
                             f"  steps {render.steps_done(p)} succeeded")
        live.update(Group(head, render.pipeline_steps(p, measured)), refresh=True)

    with live:
        yield update


def ended(json_out: bool, p: PipelineOut) -> None:
    show(json_out, p, render.pipeline)
    if p.status != "succeeded":
        bad = next((s for s in p.steps if s.status in ("failed", "timed_out", "cancelled")), None)
        why = ""
        if bad is not None:
            reason = bad.status_message or (f"exit code {bad.exit_code}" if bad.exit_code is not None else "")
            why = f": step {bad.step or bad.name} {bad.status}" + (f" ({reason})" if reason else "")
        fail(f"PIPELINE_{p.status.upper()}", f"pipeline {p.name} ({p.id}) {p.status}{why}")


def _watch(client: Any, p: PipelineOut, json_out: bool) -> None:
    with left_running("pipeline", lambda: p.id), live_steps(json_out) as update:
        final = client.pipelines.wait(p.id, progress=update)
    ended(json_out, final)


@app.command("submit")
def submit(file: SpecFile,
           wait: Annotated[bool, typer.Option("--wait", help="watch it until it ends; exit 1 unless it succeeded")]
           = False,
           json_out: Json = False, profile: Profile = None) -> None:
    """Submit a pipeline from a spec file: {name, steps: [job specs, each with needs and step outputs as inputs]}."""
    spec = read_spec(file, "pipeline")
    with connect(profile) as client:
        p = client.pipelines.submit(spec)
        if wait:
            _watch(client, p, json_out)
            return
    if json_out:
        render.print_json(p)
    else:
        _said(p, "submitted")


@app.command("list")
def list_pipelines(
    status: Annotated[str | None, typer.Option(help="pending, running, succeeded, failed, cancelled")] = None,
    name: Annotated[str | None, typer.Option(help="only the pipelines of this name")] = None,
    all_users: Annotated[bool, typer.Option("--all", help="every user's (an admin's)")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List your pipelines."""
    with connect(profile) as client:
        owner = None if all_users else client.me().username
        rows = client.pipelines.list(status=status, name=name, owner=owner, limit=limit, offset=offset)
    show(json_out, rows, render.pipelines)


@app.command("show")
def show_pipeline(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """A pipeline and a table of its steps: status, attempts, progress, why a step waits or failed."""
    with connect(profile) as client:
        p = client.pipelines.get(ref)
    show(json_out, p, render.pipeline)


@app.command("watch")
def watch(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """Follow a pipeline live until it ends (a progress line per running step); exit 1 unless it succeeded."""
    with connect(profile) as client:
        _watch(client, client.pipelines.get(ref), json_out)


@app.command("cancel")
def cancel(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """Cancel a pipeline: its waiting and running steps stop."""
    with connect(profile) as client:
        p = client.pipelines.cancel(ref)
    if json_out:
        render.print_json(p)
    else:
        _said(p, "cancel asked")


@app.command("retry")
def retry(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """Run a pipeline's failed (or cancelled) step again and the steps after it; its succeeded steps are kept."""
    with connect(profile) as client:
        p = client.pipelines.retry(ref)
    if json_out:
        render.print_json(p)
    else:
        _said(p, "retried")

