"""The ``mmanager`` client commands as a user runs them: the installed ``mmanager`` command, a separate
process per call, against a lab (the hub, controllers ``a`` and ``b`` and a gateway as real processes on
real PostgreSQL and the real Docker engine), its config file in the test's own directory. The tests read
what the user reads: stdout, stderr and the exit status."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from examples.images import EXAMPLE_IMAGE
from mmanager.client import Client
from tests.support.lab import Lab, running_lab
from tests.support.net import free_port
from tests.support.pg import create_database

ROOT = Path(__file__).resolve().parents[1]
# The console script `pip install` made, run by the environment's interpreter; `-m` where there is none.
SCRIPT = Path(sys.executable).with_name("mmanager")
MMANAGER = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mmanager.cli"]
SPEC = f"""\
name: hello
image: {EXAMPLE_IMAGE}
ports: {{"5000": null}}
health_check: {{path: /health, port: 5000, interval: 1, start_period: 5}}
resources: {{cpu_limit: 0.5, memory_limit: 32MB}}
env: {{MODEL_NAME: hello-one}}
"""


@dataclass
class Done:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cli:
    """``mmanager`` as a user's shell runs it: with its own config file, none of the hub's variables."""

    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("MMANAGER_HUB_URL", "MMANAGER_TOKEN", "MMANAGER_PROFILE")}
        # The checkout first: the command runs this code, whatever the environment installed.
        return {**env, "MMANAGER_CONFIG": str(self.home / "config.json"),
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra}

    def __call__(self, *args: str, stdin: str | None = None, ok: bool = True, **env: str) -> Done:
        done = subprocess.run([*MMANAGER, *args], input=stdin, capture_output=True, text=True, env=self.env(**env),
                              cwd=self.home, timeout=120, check=False)
        result = Done(done.returncode, done.stdout, done.stderr)
        if ok:
            assert result.status == 0, f"mmanager {' '.join(args)}: {result}"
        return result


def in_a_terminal(cli: Cli, *args: str) -> tuple[int, str]:
    """``mmanager`` run in a terminal (a pseudo-terminal): its exit status and what the terminal got, escape
    sequences included."""
    main, side = pty.openpty()
    proc = subprocess.Popen([*MMANAGER, *args], stdin=side, stdout=side, stderr=side, cwd=cli.home,
                            env=cli.env(TERM="xterm-256color", COLUMNS="120"))
    os.close(side)
    got = bytearray()
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the command ended and closed its side
            break
        if not chunk:
            break
        got += chunk
    os.close(main)
    return proc.wait(timeout=30), got.decode(errors="replace")


def plain_text(terminal: str) -> str:
    """What a terminal's bytes read as, without colours and cursor moves."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", terminal)


@pytest.fixture(scope="module")
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "cli")


@pytest.fixture(scope="module")
def lab(db_url: str, example_image: str, docker_client: docker.DockerClient,
        tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(db_url, tmp_path_factory.mktemp("lab"), request, docker_client) as lab:
        yield lab


def row(out: str, first: str) -> list[str]:
    """The table row whose first cell is ``first``, as its cells."""
    found = [line.split() for line in out.splitlines() if line.split()[:1] == [first]]
    assert len(found) == 1, out
    return found[0]


def one_error(done: Done, code: str) -> None:
    assert done.status == 1, done
    assert done.err.count("\n") == 1 and done.err.startswith(f"error: {code}: "), done.err
    assert "Traceback" not in done.err


@pytest.mark.slow
def test_a_user_manages_a_service_from_the_shell(lab: Lab, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    hub = lab.dep.hub().url
    a, b = sorted(lab.dep.controllers)

    # Login: the token on stdin, checked with the hub, kept in a file only its owner reads.
    refused = cli("login", hub, stdin="not-a-token\n", ok=False)
    one_error(refused, "UNAUTHORIZED")
    assert not (tmp_path / "config.json").exists()
    done = cli("login", hub, stdin=lab.token + "\n")
    assert done.out.strip() == f"logged in to {hub} as root (admin); saved as profile 'default'"
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o600

    # apply: created, then unchanged (no new version, no operation), then a change printed as a diff.
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC)
    done = cli("apply", "-f", str(spec))
    assert done.out.splitlines()[0] == "hello: new service"
    assert done.out.splitlines()[-1].startswith("hello: created, version 1, running, http")
    service = cli("services", "status", "hello", "--json").json()
    # Completion names the user's services, asking the hub.
    assert cli(_MMANAGER_COMPLETE="complete_bash", COMP_WORDS="mmanager services status he",
               COMP_CWORD="3").out.split() == ["hello"]
    operations = cli("operations", "list", "--service", service["id"], "--json").json()
    assert cli("apply", "-f", str(spec)).out == "hello: unchanged\n"
    assert cli("operations", "list", "--service", service["id"], "--json").json() == operations
    spec.write_text(SPEC.replace("32MB", "64MB").replace("hello-one", "hello-two"))
    done = cli("apply", "-f", str(spec))
    assert done.out.splitlines() == ["hello: changes", "  resources.memory_limit: 32MB -> 64MB",
                                     "  env.MODEL_NAME: hello-one -> hello-two", "hello: updated, version 2, running"]

    # A bad spec: one line with the hub's code, a failing status, and nothing changed.
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("32MB", "1KB").replace("cpu_limit: 0.5", "cpu_limit: 0.25"))
    refused = cli("apply", "-f", str(bad), ok=False)
    one_error(refused, "VALIDATION_ERROR")
    assert "resources.memory_limit" in refused.err and refused.out == ""
    listed = cli("services", "list", "--json").json()
    assert [(s["id"], s["version"], s["spec"]["resources"]["cpu_limit"]) for s in listed] == [(service["id"], 2, 0.5)]

    # What runs, as tables.
    assert row(cli("services", "list").out, "hello")[1:5] == ["root", "running", "healthy", "1/1"]
    shown = cli("services", "status", "hello").out
    assert row(shown, "status")[1] == "running" and row(shown, "id")[1] == service["id"]
    assert "model service hello-two listening on 5000" in cli("services", "logs", "hello").out
    # logs -f prints lines as they come, and ends quietly on Ctrl-C.
    following = subprocess.Popen([*MMANAGER, "services", "logs", "hello", "-f", "--tail", "1000"], cwd=tmp_path,
                                 env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert following.stdout is not None
    assert next(following.stdout) == "model service hello-two listening on 5000\n"
    following.send_signal(signal.SIGINT)
    _, err = following.communicate(timeout=30)
    assert (following.returncode, err) == (130, "")

    # Scale, in a terminal: a progress bar while it runs, in colour; then history and rollback.
    code, terminal = in_a_terminal(cli, "services", "scale", "hello", "2")
    assert code == 0, terminal
    assert "━" in terminal and "scale" in terminal and "\x1b[" in terminal
    assert "hello: scaled to 2; status running, replicas 2/2, version 2" in plain_text(terminal)
    history = cli("services", "history", "hello").out
    assert row(history, "1")[1:4] == ["-", EXAMPLE_IMAGE, "create"]
    assert row(history, "2")[1:4] == ["*", EXAMPLE_IMAGE, "update"]
    done = cli("services", "rollback", "hello", "1")
    assert done.out.startswith("hello: rolled back to version 1's spec; status running, replicas 2/2, version 3")
    rolled = cli("services", "status", "hello", "--json").json()
    assert rolled["spec"]["resources"]["memory_limit"] == "32MB"

    # Controllers: drain one (its copy moves to the other), then enable it again.
    assert row(cli("controllers", "list").out, a)[2:4] == ["healthy", "yes"]
    with_copy = rolled["replicas"][0]["controller_id"]
    other = b if with_copy == a else a
    done = cli("controllers", "drain", with_copy)
    assert done.out.startswith(f"{with_copy}: drained;")
    moved = cli("services", "status", "hello", "--json").json()
    assert {r["controller_id"] for r in moved["replicas"]} == {other}
    assert row(cli("controllers", "list").out, with_copy)[3] == "no"
    assert cli("controllers", "enable", with_copy).out.startswith(f"{with_copy}: enabled;")

    # The operations: each of the user's steps, newest first.
    ops = cli("operations", "list", "--service", service["id"]).out
    kinds = [cells[1] for cells in map(str.split, ops.splitlines()) if cells and re.fullmatch("[0-9a-f]{32}", cells[0])]
    assert kinds[-4:] == ["rollback", "scale", "update", "create"] and "migrate" in kinds, ops

    # A model file uploaded in a terminal: a byte bar while it goes, then its digest; deleted by the digest.
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x07" * 300_000)
    code, terminal = in_a_terminal(cli, "models", "files", "upload", str(weights), "--name", "weights.bin")
    digest = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert code == 0 and "━" in terminal and "upload weights.bin" in terminal, terminal
    assert f"{digest}\nweights.bin: 300.0 kB stored; in a spec: models: [{{digest: {digest}}}]" \
        in plain_text(terminal).replace("\r", ""), terminal
    assert cli("models", "files", "delete", digest).out == f"{digest}: deleted\n"
    # An admin lists a controller's images: the service's is there.
    assert row(cli("images", "list", a).out, EXAMPLE_IMAGE.rpartition(":")[0])[1] == EXAMPLE_IMAGE.rpartition(":")[2]

    # Delete: asks first; a "no" keeps the service.
    kept = cli("services", "delete", "hello", stdin="n\n", ok=False)
    assert kept.status == 2 and "not deleted" in kept.err
    assert cli("services", "delete", "hello", "--yes").out.strip() == "hello: deleted"
    assert cli("services", "list", "--json").json() == []
    one_error(cli("services", "status", "hello", ok=False), "SERVICE_NOT_FOUND")


def test_an_unreachable_hub_is_one_line(tmp_path: Path) -> None:
    done = Cli(tmp_path)("services", "list", ok=False, MMANAGER_HUB_URL=f"http://127.0.0.1:{free_port()}",
                         MMANAGER_TOKEN="x")
    one_error(done, "HUB_UNREACHABLE")


def test_no_login_is_one_line(tmp_path: Path) -> None:
    done = Cli(tmp_path)("services", "list", ok=False)
    assert done.status == 1 and done.err.startswith("error: ") and done.err.count("\n") == 1, done


def test_shell_completion_completes_commands(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    done = cli(_MMANAGER_COMPLETE="complete_bash", COMP_WORDS="mmanager ser", COMP_CWORD="1")
    assert done.out.split() == ["services"]
    done = cli(_MMANAGER_COMPLETE="complete_bash", COMP_WORDS="mmanager controllers d", COMP_CWORD="2")
    assert sorted(done.out.split()) == ["delete", "disable", "drain"]
    # As a user asks for it: from bash, which the command finds as its parent shell (there is no shell to
    # find when pytest runs it straight, as under CI).
    shown = subprocess.run(["bash", "-c", f"{shlex.join(MMANAGER)} --show-completion"], capture_output=True,
                           text=True, env=cli.env(), cwd=cli.home, timeout=120, check=False)
    assert shown.returncode == 0 and "_mmanager_completion" in shown.stdout, shown


@pytest.mark.slow
def test_a_user_runs_a_job_and_a_pipeline_from_the_shell(lab: Lab, tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    hub = lab.dep.hub().url
    cli("login", hub, stdin=lab.token + "\n")
    data = tmp_path / "reads.tsv"
    data.write_text("id\tseq\nr1\tacgt\n")
    script = "mkdir -p /outputs/out && tr a-z A-Z < /inputs/reads.tsv > /outputs/out/upper.tsv && echo converted"
    # The local input is uploaded first, then the job runs; --wait ends with the job, status 0 as it succeeded.
    done = cli("jobs", "run", "--image", EXAMPLE_IMAGE, "--input", str(data), "--name", "upper", "--memory", "32MB",
               "--cpu", "0.5", "--wait", "--", "sh", "-c", script)
    assert done.out.startswith("upper: succeeded after ") and "uploaded as artifact" in done.err, done
    assert "converted" in cli("jobs", "logs", "upper").out
    got = cli("jobs", "download", "upper", "--out", str(tmp_path / "results"))
    assert got.out == f"{tmp_path}/results/out/upper.tsv\n"
    assert (tmp_path / "results/out/upper.tsv").read_text() == "ID\tSEQ\nR1\tACGT\n"
    with Client(url=hub, token=lab.token) as client:
        job = client.jobs.get("upper")
    assert (job.status, job.exit_code, [a.status for a in job.attempts]) == ("succeeded", 0, ["succeeded"])

    # A pipeline whose second step reads the first's output: submitted and waited for, then its steps.
    spec = tmp_path / "chain.yaml"
    spec.write_text(f"""\
name: chain
steps:
- {{name: make, image: {EXAMPLE_IMAGE}, resources: {{memory_limit: 32MB}},
   command: [sh, -c, "mkdir -p /outputs/d && echo hello > /outputs/d/x.txt"]}}
- {{name: shout, image: {EXAMPLE_IMAGE}, resources: {{memory_limit: 32MB}}, inputs: [{{step: make, path: d/x.txt}}],
   command: [sh, -c, "tr a-z A-Z < /inputs/d/x.txt > /outputs/loud.txt"]}}
""")
    shown = cli("pipelines", "submit", "-f", str(spec), "--wait").out
    assert row(shown, "status")[1] == "succeeded" and row(shown, "shout")[1] == "succeeded", shown
    cli("jobs", "download", "shout", "--out", str(tmp_path / "loud"))
    assert (tmp_path / "loud/loud.txt").read_text() == "HELLO\n"
