"""The model a process serves and what its endpoints share: the one worker thread every model call runs on,
the batcher in front of it, and the metrics.

Invariant: ``ready()`` is the only way to reach the model; until ``load()`` succeeded, and again once the batcher
takes no more work (stopped, or its loop died), it raises ``MODEL_NOT_LOADED`` with the reason (still loading,
why loading failed, why the batcher stopped), so ``/health`` fails rather than requests hanging.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from modelserver.backends import Backend, Item
from modelserver.backends import load as load_backend
from modelserver.batching import Batcher, BatcherStopped
from modelserver.config import ModelConfig, Settings, load_config
from modelserver.errors import ModelNotLoaded, PredictionFailed, ServiceError
from modelserver.metrics import Metrics

log = logging.getLogger("modelserver")


@dataclass
class Loaded:
    config: ModelConfig
    backend: Backend
    batcher: Batcher[Item, dict[str, Any]]


class ModelService:
    """The model this process serves, once loaded, and what the endpoints share: metrics, the worker thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.loaded.set(0)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.loaded: Loaded | None = None
        self.problem = "the model is loading"
        self.started = time.monotonic()

    async def load(self) -> None:
        try:
            config = load_config(self.settings)
            backend = await asyncio.get_running_loop().run_in_executor(
                self.executor, load_backend, config, self.settings.type_dir)
        except ServiceError as exc:
            self.problem = exc.details
            log.error("model not loaded: %s", exc.details)
            return
        except Exception as exc:
            self.problem = f"loading the model failed: {exc!r}"
            log.exception("model not loaded")
            return
        batcher: Batcher[Item, dict[str, Any]] = Batcher(
            backend.run, self.executor, enabled=config.batching.enabled,
            max_batch_size=config.batching.max_batch_size, max_wait_s=config.batching.max_wait_ms / 1000,
            observe=self.metrics.observe_batch)
        batcher.start()
        self.loaded = Loaded(config, backend, batcher)
        self.metrics.device.labels(backend.device.type, config.name).set(1)
        self.metrics.loaded.set(1)
        log.info("serving %s on %s (batching %s)", config.name, backend.device, config.batching.enabled)

    async def close(self) -> None:
        if self.loaded is not None:
            await self.loaded.batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> Loaded:
        if self.loaded is None:
            raise ModelNotLoaded(self.problem)
        if self.loaded.batcher.failure is not None:
            self.metrics.loaded.set(0)
            raise ModelNotLoaded(self.loaded.batcher.failure)
        return self.loaded

    async def answer(self, loaded: Loaded, items: list[Item]) -> list[dict[str, Any]]:
        try:
            return await loaded.batcher.submit(items)
        except ServiceError:
            raise
        except BatcherStopped as exc:
            raise ModelNotLoaded(str(exc)) from exc
        except Exception as exc:
            log.exception("prediction failed")
            raise PredictionFailed(f"{type(exc).__name__}: {exc}") from exc
