"""The reference model service for tests and benchmarks: its weights built into a directory, and the app
served by uvicorn on a real port, in a thread of this process (``served_model``) or as its own process
(``model_process``, ``python -m modelserver``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from modelserver.app import create_app
from modelserver.config import Settings
from tests.support.net import free_port, terminate, wait_for_port
from tests.support.poll import wait_until

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def served_model(settings: Settings | FastAPI, start_timeout: float = 30.0) -> Iterator[str]:
    """The service (or an app ``create_app`` made) served; its URL once it listens (the model may still be
    loading: see ``wait_loaded``); stopped on the way out."""
    port = free_port()
    app = settings if isinstance(settings, FastAPI) else create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name=f"modelserver-{port}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), start_timeout, "the model service to listen",
                   interval=0.02)
        assert server.started, "the model service stopped before it listened"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_loaded(url: str, timeout: float = 30.0) -> None:
    """Return once ``/health`` answers 200 (the model is loaded)."""
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, timeout,
               f"{url}/health to answer 200", interval=0.05)


@contextmanager
def model_process(model_dir: Path, model_type: str, **env: str) -> Iterator[str]:
    """``python -m modelserver`` serving ``model_type`` from ``model_dir``, loaded; its URL. ``env``: more
    environment (MODEL_BATCHING=0, ...)."""
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MODEL_DIR": str(model_dir), "MODEL_TYPE": model_type,
                   "HOST": "127.0.0.1", "PORT": str(port), **env}
    # A file, not a pipe: a pipe nobody reads fills up and stops the server mid-benchmark.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "modelserver"], env=environment, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            try:
                wait_for_port(port, timeout=60, proc=proc)
            except RuntimeError as exc:
                log.seek(0)
                raise RuntimeError(f"{exc}: {log.read().decode(errors='replace')[-2000:]}") from None
            url = f"http://127.0.0.1:{port}"
            wait_loaded(url)
            yield url
        finally:
            terminate(proc)


def build_weights(model_dir: Path, *types: str) -> Path:
    """The weights and configs of ``types`` (every type when none) made under ``model_dir``; ``model_dir``."""
    subprocess.run([sys.executable, "-m", "modelserver.weights", "--out", str(model_dir),
                    *(["--types", *types] if types else [])], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return model_dir
