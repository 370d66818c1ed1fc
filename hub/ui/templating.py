"""The console's Jinja2 environment: autoescaping on for every template (what the hub returns, a service's
name, labels and log lines included, is text in the page, never markup) and undefined names an error."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "—"


def web_url(value: str | None) -> str | None:
    """``value`` if it is an http(s) URL, for an ``href``; None otherwise (no ``javascript:`` links)."""
    return value if value and urlsplit(value).scheme in ("http", "https") else None


def short(value: str | None, n: int = 12) -> str:
    return "—" if not value else value[:n]


def job_progress(value: Any) -> str:
    """A job's ``JobProgress`` as the CLI reads it: ``12,000/52,000 records (8,100 rec/s)``; ``—`` for none."""
    from mmanager.commands.render import job_progress as line

    return "—" if value is None else line(value)


environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
environment.filters.update(when=when, web_url=web_url, short=short, job_progress=job_progress)
templates = Jinja2Templates(env=environment)
