"""The HAProxy child process and its two sockets: the master CLI (reload, which workers run) and the
worker's runtime API (servers, maps).

Invariant: one HAProxy master per ``HAProxy`` object, started with ``-W`` from the configuration file
in the state directory, and it never outlives the agent that started it (the parent-death signal);
a reload is over only once the master lists a new worker, so the next runtime command reaches the
worker that serves the new configuration.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class HAProxyError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the agent dies, so no orphan keeps the ports."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def ask(path: str | Path, command: str, timeout: float = 5.0) -> str:
    """One command on a HAProxy CLI socket; its whole answer (the socket closes once it is written)."""

    async def exchange() -> str:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            # The master CLI keeps the connection for more commands until the client's side is shut.
            writer.write_eof()
            return (await reader.read()).decode(errors="replace")
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)


async def check_config(files: Mapping[str, str], folder: Path, haproxy: str = "haproxy") -> str | None:
    """``haproxy -c`` on a configuration and its map files (``files`` by name, ``haproxy.cfg`` among them,
    rendered for ``folder``) written to ``folder``; None when valid, else HAProxy's words."""
    for name, text in files.items():
        (folder / name).write_text(text)
    proc = await asyncio.create_subprocess_exec(
        haproxy, "-c", "-q", "-f", str(folder / "haproxy.cfg"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return None if proc.returncode == 0 else out.decode(errors="replace").strip()


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader (a starting HAProxy) sees old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class HAProxy:
    def __init__(self, state_dir: Path, binary: str = "haproxy", env: Mapping[str, str] | None = None) -> None:
        self.state_dir = state_dir
        # HAProxy's environment on top of the agent's (what its Lua reads: never in the files).
        self.env = dict(env or {})
        self.config = state_dir / "haproxy.cfg"
        self.master_socket = state_dir / "master.sock"
        self.stats_socket = state_dir / "haproxy.sock"
        self.binary = shutil.which(binary) or binary
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 15.0) -> None:
        """Start the master from the configuration on disk; return once its worker answers."""
        for stale in (self.master_socket, self.stats_socket):
            stale.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "-W", "-db", "-f", str(self.config), "-S", str(self.master_socket),
            preexec_fn=_die_with_parent, stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **self.env})
        log.info("haproxy started (master pid %s)", self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise HAProxyError(f"haproxy exited with {self.proc.returncode} while starting (see its lines above)")
            try:
                if "Pid:" in await ask(self.stats_socket, "show info", timeout=1.0):
                    return
            except (OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy did not answer on {self.stats_socket} within {timeout:g} s")
            await asyncio.sleep(0.02)

    async def workers(self) -> tuple[list[int], int]:
        """The current workers' pids and the master's failed reload count (``show proc``)."""
        current, _, failed = await self.processes()
        return current, failed

    async def processes(self) -> tuple[list[int], list[int], int]:
        """The current workers' pids, the old workers' (a reload retired them: they finish what they
        serve) and the master's failed reload count."""
        text = await ask(self.master_socket, "show proc")
        current: list[int] = []
        old: list[int] = []
        failed = 0
        section = "master"
        for line in text.splitlines():
            if line.startswith("# "):
                section = line[2:].strip()
                continue
            fields = line.split()
            if not fields or line.startswith("#"):
                continue
            if section == "master" and "[failed:" in line:
                failed = int(line.split("[failed:")[1].split("]")[0])
            elif section in ("workers", "old workers") and fields[0].isdigit():
                (current if section == "workers" else old).append(int(fields[0]))
        return current, old, failed

    async def reload(self, timeout: float = 15.0) -> None:
        """Reload the master (same command line, the configuration file re-read); return once a new
        worker serves. The old worker finishes its requests in flight and goes."""
        before, failed_before = await self.workers()
        await ask(self.master_socket, "reload")
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(0.02)
            try:
                now, failed = await self.workers()
            except (OSError, TimeoutError):
                now, failed = [], failed_before  # the master is re-executing itself
            if failed > failed_before:
                raise HAProxyError("haproxy refused the new configuration (see its lines above)")
            if now and not set(now) & set(before):
                return
            if time.monotonic() > deadline:
                raise HAProxyError(f"no new haproxy worker within {timeout:g} s of a reload")

    async def command(self, command: str) -> str:
        """One runtime API command on the current worker; its answer, stripped."""
        return (await ask(self.stats_socket, command)).strip()

    async def stats(self, kind: int, columns: tuple[str, ...]) -> dict[str, list[int]]:
        """``show stat`` of backends (``kind`` 2) or servers (4): the numeric ``columns`` by
        ``backend`` or ``backend/server``."""
        lines = (await self.command(f"show stat -1 {kind} -1")).splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        px, sv = header.index("pxname"), header.index("svname")
        wanted = [header.index(column) for column in columns]
        out = {}
        for line in lines[1:]:
            fields = line.split(",")
            if len(fields) < len(header):
                continue
            name = fields[px] if kind == 2 else f"{fields[px]}/{fields[sv]}"
            out[name] = [int(fields[i]) if fields[i].isdigit() else 0 for i in wanted]
        return out

    async def requests(self) -> dict[str, int]:
        """HTTP requests each backend has received since this worker started."""
        return {name: values[0] for name, values in (await self.stats(2, ("req_tot",))).items()}

    async def busy_servers(self) -> set[str]:
        """``backend/server`` of the servers with a request in progress or queued."""
        return {name for name, (cur, queued) in (await self.stats(4, ("scur", "qcur"))).items() if cur or queued}

    async def stop(self, grace: float = 5.0) -> None:
        """A soft stop (the worker finishes what it serves), hard after ``grace`` seconds."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGUSR1, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), wait)
                break
            except TimeoutError:
                continue
        log.info("haproxy stopped")
