"""``mmanager jobs …``: batch jobs over the hub's API (a user's own; an admin's: everyone's with ``--all``),
named by id or by the name of one of the user's own (the newest of that name).

Invariant: each command is the SDK's calls and nothing else (``run`` uploads its local input files first,
then submits); a wait shows a live progress line on a terminal only, and ends with exit status 0 only for
a job that succeeded (else ``error: JOB_<STATUS>: …``, exit 1); Ctrl-C leaves the job running on the hub
and says so (exit 130).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmanager.commands import render
from mmanager.commands.model_files import _byte_bar
from mmanager.commands.render import escape
from mmanager.commands.session import (
    INTERRUPTED,
    USAGE,
    Json,
    Profile,
    completions,
    connect,
    fail,
    note,
    show,
    stdout,
)

if TYPE_CHECKING:
    from hub.job_schemas import JobOut
    from mmanager.client import Client

app = typer.Typer(help="Batch jobs: a container run to its end, queued until there is room, with its logs, "
                       "progress and output artifacts.", no_args_is_help=True)

_ARTIFACT_ID = re.compile(r"[0-9a-f]{32}")


def _own_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return completions(ctx, incomplete, lambda c: sorted({j.name for j in c.jobs.list(owner=c.me().username,
                                                                                       limit=1000)}))


Ref = Annotated[str, typer.Argument(help="the job: its id, or the name of one of yours (the newest of that name)",
                                    show_default=False, autocompletion=_own_names)]
SpecFile = Annotated[Path, typer.Option("--file", "-f", help="the spec, YAML or JSON (-: stdin)", show_default=False)]
Wait = Annotated[bool, typer.Option("--wait", help="wait until it ends, with a progress line; exit 1 unless it "
                                                   "succeeded")]
Follow = Annotated[bool, typer.Option("--follow", help="print its log as it runs (each attempt's), until it ends; "
                                                       "exit 1 unless it succeeded")]


def read_spec(path: Path, what: str) -> dict[str, Any]:
    """The one spec of a YAML or JSON file (``-``: stdin), as the JSON the hub is sent; a file that cannot
    be read or parsed is a usage error (exit 2)."""
    import yaml

    from mmanager.commands.apply import SpecError, as_json

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        fail("INVALID_FILE", f"{path}: {exc.strerror or exc}", USAGE)
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fail("INVALID_FILE", f"{path}: not {'JSON' if path.suffix == '.json' else 'YAML'}: {first}", USAGE)
    if not isinstance(doc, dict):
        fail("VALIDATION_ERROR", f"{path}: a {what} spec is a mapping, not {type(doc).__name__}")
    try:
        spec: dict[str, Any] = as_json(doc, f"{path}: ")
    except SpecError as exc:
        fail(exc.code, exc.message, exc.status)
    return spec


@contextmanager
def left_running(kind: str, ref: Callable[[], str | None]) -> Iterator[None]:
    """Ctrl-C while waiting: the job (or pipeline) goes on on the hub; say so, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        found = ref()
        if found:
            note(f"interrupted; {kind} {escape(found)} goes on on the hub (mmanager {kind}s cancel {escape(found)} "
                 "stops it)")
        raise typer.Exit(INTERRUPTED) from None


class Rates:
    """Each job's rate measured across polls (for a job that reports none): units a second since it was
    first seen with progress."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, float]] = {}

    def of(self, job: Any) -> float | None:
        p = job.progress
        if p is None or p.rate is not None:
            return None
        now = time.monotonic()
        done0, at0 = self.first.setdefault(job.id, (p.done, now))
        return (p.done - done0) / (now - at0) if now - at0 >= 1.0 and p.done > done0 else None


@contextmanager
def job_line(json_out: bool, label: str) -> Iterator[Callable[[Any], None]]:
    """The SDK's ``progress`` callback for a job: a live line on a terminal (status, a bar when the job
    reports a total, ``12,000/52,000 records (8,100 rec/s)``, time elapsed); nothing with ``--json`` or a
    pipe."""
    if json_out or not sys.stdout.isatty():
        yield lambda job: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[line]}"),
                   TimeElapsedColumn(), console=stdout(), transient=True)
    task = bar.add_task(escape(label), total=None, line="")
    rates = Rates()

    def update(job: Any) -> None:
        p = job.progress
        why = f" ({job.status_message})" if job.status == "pending" and job.status_message else ""
        bar.update(task, description=escape(f"{job.name} {job.status}{why}"),
                   total=(p.total or None) if p is not None else None, completed=p.done if p is not None else 0,
                   line=escape(render.job_progress(p, rates.of(job)) if p is not None else ""), refresh=True)

    with bar:
        yield update


def ended(json_out: bool, job: JobOut, quiet: bool = False) -> None:
    """A waited-for job's end: its JSON or one line (on stderr when ``quiet``: the log had stdout), and exit
    1 with ``JOB_<STATUS>`` unless it succeeded."""
    if json_out and not quiet:
        render.print_json(job)
    elif not json_out:
        line = (f"[bold]{escape(job.name)}[/bold]: {render.styled(job.status, render.JOB_STATUS).markup}"
                f" after {render.took(job.started_at, job.finished_at) or '0s'}"
                + (f", {escape(render.job_progress(job.progress))}" if job.progress is not None else "")
                + f" (job {job.id})")
        if quiet:
            note(line)
        else:
            stdout().print(line)
    if job.status != "succeeded":
        why = job.status_message or (f"exit code {job.exit_code}" if job.exit_code is not None else "")
        fail(f"JOB_{job.status.upper()}", f"job {job.name} ({job.id}) {job.status}" + (f": {why}" if why else ""))


class _Began(Exception):
    """Raised from a wait's ``progress`` to stop it: the job has a new attempt running, or has ended."""

    def __init__(self, job: Any) -> None:
        self.job = job


def follow(client: Client, job: JobOut, json_out: bool) -> JobOut:
    """Print each attempt's log as it runs, until the job ends; the job as it ended."""
    from hub.job_schemas import JOB_FINAL

    printed = 0  # the last attempt whose log was followed

    def began(seen: Any) -> None:
        last = seen.attempts[-1] if seen.attempts else None
        if seen.status in JOB_FINAL or (last is not None and last.number > printed and last.status != "starting"):
            raise _Began(seen)

    while True:
        try:
            job = client.jobs.wait(job.id, progress=began)
        except _Began as stop:
            job = stop.job
        last = job.attempts[-1] if job.attempts else None
        if last is None or last.number <= printed:
            return job
        if printed:
            # stderr: stdout stays the log alone.
            note(f"-- attempt {last.number} on {escape(last.controller_id)} --")
        with client.jobs.follow_logs(job.id, attempt=last.number) as lines:
            for line in lines:
                line = line.rstrip("\n")
                sys.stdout.write((json.dumps(line, ensure_ascii=False) if json_out else line) + "\n")
                sys.stdout.flush()
        printed = last.number


def launch(client: Client, spec: dict[str, Any], wait: bool, follow_log: bool, json_out: bool) -> None:
    """Submit ``spec``, then (``wait``/``follow_log``) see it to its end."""
    job = client.jobs.submit(spec)
    if not (wait or follow_log):
        if json_out:
            render.print_json(job)
        else:
            stdout().print(f"[bold]{escape(job.name)}[/bold]: {render.styled(job.status, render.JOB_STATUS).markup}"
                           + (f" ({escape(job.status_message)})" if job.status_message else "") + f", job {job.id}")
        return
    with left_running("job", lambda: job.id):
        if follow_log:
            final = follow(client, job, json_out)
        else:
            with job_line(json_out, f"{job.name} {job.status}") as line:
                final = client.jobs.wait(job.id, progress=line)
    ended(json_out, final, quiet=follow_log)


@app.command("submit")
def submit(file: SpecFile, wait: Wait = False, follow_log: Follow = False, json_out: Json = False,
           profile: Profile = None) -> None:
    """Queue a job from a spec file (name, image, command, args, env, inputs, resources, retries, timeout,
    priority); it starts once a controller has room."""
    spec = read_spec(file, "job")
    with connect(profile) as client:
        launch(client, spec, wait, follow_log, json_out)


def _env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail("INVALID_ARGUMENT", f"--env {pair}: give it as KEY=VALUE", USAGE)
        env[key] = value
    return env


def _default_name(image: str) -> str:
    """A job's name from its image: ``registry/lab/feat:1`` is ``feat``."""
    base = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("-_.")[:63]
    return name or "job"


def _inputs(client: Client, given: list[str], json_out: bool) -> list[Any]:
    """Each ``--input``: a local file, uploaded (an artifact of the same name and bytes is reused), or an
    artifact's id."""
    found: list[Any] = []
    for value in given:
        path = Path(value)
        if path.is_file():
            with _byte_bar(json_out, f"upload {path.name}") as bar:
                row = client.artifacts.upload(path, progress=bar)
            note(f"{escape(path.name)}: uploaded as artifact {row.id} ({render.size(row.size)}), at "
                 f"/inputs/{escape(row.path)}")
            found.append(row.id)
        elif _ARTIFACT_ID.fullmatch(value):
            found.append(value)
        else:
            fail("INVALID_FILE", f"--input {value}: no such file, nor an artifact id (32 hex digits)", USAGE)
    return found


@app.command("run", context_settings={"allow_interspersed_args": False})
def run(
    image: Annotated[str, typer.Option(help="the image to run", show_default=False)],
    command: Annotated[list[str] | None, typer.Argument(
        help="the command and its arguments, after -- (default: the image's own)", show_default=False)] = None,
    input: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="a local file (uploaded first) or an artifact id, mounted under /inputs; repeat it")]
    = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE; repeat it")] = None,
    gpus: Annotated[int, typer.Option(min=0, help="whole GPUs")] = 0,
    memory: Annotated[str | None, typer.Option(help="memory limit: 512m, 2g")] = None,
    cpu: Annotated[float | None, typer.Option(min=0.01, help="CPUs")] = None,
    retries: Annotated[int, typer.Option(min=0, max=10, help="attempts again after a failure, with backoff")] = 0,
    timeout: Annotated[float | None, typer.Option(min=0.001, help="seconds an attempt may run")] = None,
    priority: Annotated[int, typer.Option(min=-100, max=100, help="higher starts first")] = 0,
    name: Annotated[str | None, typer.Option(help="the job's name (default: the image's)")] = None,
    wait: Wait = False, follow_log: Follow = False, json_out: Json = False, profile: Profile = None,
) -> None:
    """Run a command in a container as a job: mmanager jobs run --image IMG --input data.tsv -- python run.py."""
    resources: dict[str, Any] = {}
    if gpus:
        resources |= {"gpu_required": True, "gpu_count": gpus}
    if memory is not None:
        resources["memory_limit"] = memory
    if cpu is not None:
        resources["cpu_limit"] = cpu
    spec: dict[str, Any] = {"name": name or _default_name(image), "image": image, "command": list(command or []),
                            "env": _env(env or []), "resources": resources, "retries": retries,
                            "priority": priority}
    if timeout is not None:
        spec["timeout"] = timeout
    with connect(profile) as client:
        spec["inputs"] = _inputs(client, input or [], json_out)
        launch(client, spec, wait, follow_log, json_out)


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="pending, running, succeeded, failed, cancelled, timed_out")]
    = None,
    name: Annotated[str | None, typer.Option(help="only the jobs of this name")] = None,
    pipeline: Annotated[str | None, typer.Option(help="only this pipeline's steps (its id)")] = None,
    all_users: Annotated[bool, typer.Option("--all", help="every user's (an admin's; a user sees only theirs)")]
    = False,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List your jobs."""
    with connect(profile) as client:
        owner = None if all_users else client.me().username
        rows = client.jobs.list(status=status, name=name, owner=owner, pipeline_id=pipeline, limit=limit,
                                offset=offset)
    show(json_out, rows, render.jobs)


@app.command("show")
def show_job(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """A job: its status and why it waits (each controller's reason), its progress and its attempts."""
    with connect(profile) as client:
        job = client.jobs.get(ref)
    show(json_out, job, render.job)


@app.command("wait")
def wait_job(ref: Ref, timeout: Annotated[float | None, typer.Option(help="seconds to wait at most")] = None,
             json_out: Json = False, profile: Profile = None) -> None:
    """Wait for a job to end, with a progress line; exit 1 unless it succeeded."""
    with connect(profile) as client, left_running("job", lambda: ref), job_line(json_out, ref) as line:
        job = client.jobs.wait(ref, progress=line, timeout=timeout)
    ended(json_out, job)


@app.command("logs")
def logs(
    ref: Ref,
    follow_log: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
    attempt: Annotated[int | None, typer.Option(min=1, help="an attempt's number (default: the current one)")]
    = None,
    tail: Annotated[int | None, typer.Option(min=0, help="only the last N lines")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON: {\"logs\": text}; with -f one JSON string a line")]
    = False,
    profile: Profile = None,
) -> None:
    """A job's log: live while it runs, kept after its container is gone."""
    with connect(profile) as client:
        if not follow_log:
            text = client.jobs.logs(ref, attempt=attempt, tail=tail)
            if json_out:
                render.print_json({"logs": text})
            else:
                sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
            return
        if attempt is None and tail is None:
            job = client.jobs.get(ref)
            with left_running("job", lambda: job.id):
                follow(client, job, json_out)
            return
        with client.jobs.follow_logs(ref, attempt=attempt, tail=tail) as lines:
            for line in lines:
                line = line.rstrip("\n")
                sys.stdout.write((json.dumps(line, ensure_ascii=False) if json_out else line) + "\n")
                sys.stdout.flush()


@app.command("cancel")
def cancel(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """Stop a job (JOB_FINISHED when it has already ended)."""
    with connect(profile) as client:
        job = client.jobs.cancel(ref)
    if json_out:
        render.print_json(job)
    else:
        stdout().print(f"[bold]{escape(job.name)}[/bold]: {render.styled(job.status, render.JOB_STATUS).markup}"
                       f" (job {job.id})")


@app.command("artifacts")
def artifacts(ref: Ref, attempt: Annotated[int | None, typer.Option(min=1, help="an attempt's number")] = None,
              json_out: Json = False, profile: Profile = None) -> None:
    """A job's outputs (what it wrote under /outputs): the succeeded attempt's, else the last one's."""
    with connect(profile) as client:
        rows = client.jobs.artifacts(ref, attempt=attempt)
    show(json_out, rows, render.artifacts)


@app.command("download")
def download(
    ref: Ref,
    out: Annotated[Path, typer.Option("--out", "-o", help="the folder to save them in")] = Path("."),
    path: Annotated[str | None, typer.Option(help="only this output (or those under this folder)")] = None,
    attempt: Annotated[int | None, typer.Option(min=1, help="an attempt's number")] = None,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Save a job's outputs under a folder at their paths, each checked against its sha256; print each path."""
    with connect(profile) as client, _byte_bar(json_out, f"download {ref}") as bar:
        saved = client.jobs.download(ref, out, path=path, attempt=attempt, progress=bar)
    if json_out:
        render.print_json([os.fspath(p) for p in saved])
    else:
        for p in saved:
            print(p)
