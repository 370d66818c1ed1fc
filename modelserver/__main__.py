"""``python -m modelserver``: serve the model of ``MODEL_TYPE`` on ``$HOST:$PORT`` (see ``modelserver.config``)."""

from __future__ import annotations

import logging

import uvicorn

from modelserver.app import create_app
from modelserver.config import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    # No access log: one line per request costs more than a small model's forward pass.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False)


if __name__ == "__main__":
    main()
