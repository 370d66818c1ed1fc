"""``python -m modelserver``: serve the model of ``MODEL_TYPE`` on ``$HOST:$PORT`` (see ``modelserver.config``)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from modelserver.app import create_app
from modelserver.config import Settings

SWITCH_INTERVAL_S = 0.0002


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    # The event loop and the model's thread hand the GIL to each other around every torch operation; at the
    # default 5 ms interval one waiting for the other's Python to yield stalls for that long, again and again.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # No access log: one line per request costs more than a small model's forward pass.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False)


if __name__ == "__main__":
    main()
