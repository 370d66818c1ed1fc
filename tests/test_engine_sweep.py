"""The test engines' sweep (tests/support/engines.py) removes what an engine of a dead process left behind (its
root under /tmp, its bridge) and keeps what a live process owns. Needs root, as the engines do."""

import fcntl
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.support import engines


def leftover(owner: int) -> tuple[Path, str]:
    root = Path(f"/tmp/mme-{uuid.uuid4().hex[:8]}")
    bridge = f"mmb{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / engines.OWNER).write_text(str(owner))
    (root / engines.BRIDGE).write_text(bridge)
    (root / "data").mkdir()
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    return root, bridge


def bridge_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True, check=False).returncode == 0


def test_the_sweep_removes_a_dead_engines_leftovers_and_keeps_a_live_ones() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_root, dead_bridge = leftover(int(done.stdout))
    live_root, live_bridge = leftover(os.getpid())
    try:
        with engines.LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            engines._sweep()
        assert not dead_root.exists() and not bridge_exists(dead_bridge)
        assert live_root.exists() and bridge_exists(live_bridge)
    finally:
        for root, bridge in ((dead_root, dead_bridge), (live_root, live_bridge)):
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
            subprocess.run(["rm", "-rf", str(root)], check=False)


def test_the_engine_leaves_the_hosts_forwarding_alone() -> None:
    binary = subprocess.run(["sh", "-c", "command -v dockerd"], capture_output=True, text=True).stdout.strip()
    flags = engines._quiet_flags(binary)
    assert "--iptables=false" in flags and "--ip-forward=false" in flags
