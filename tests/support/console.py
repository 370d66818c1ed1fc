"""A browser's part in the console's forms, for tests that drive ``/ui`` over HTTP without a browser: the
login form's double-submit nonce, the session cookie, each page's CSRF token and the Origin a browser sends."""

from __future__ import annotations

from typing import Any

import httpx


def csrf_of(page: str) -> str:
    return page.split('name="csrf" value="')[1].split('"')[0]


class ConsoleSession:
    """``client``: an httpx client on the hub (its base URL the hub's origin), which keeps cookies."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.origin = str(client.base_url).rstrip("/")

    async def log_in(self, token: str) -> httpx.Response:
        form = await self.client.get("/ui/login")
        return await self.client.post("/ui/login", data={"csrf": csrf_of(form.text), "token": token},
                                      headers={"Origin": self.origin})

    async def post(self, path: str, page: str, data: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        """The form at ``path`` as sent from ``page`` (whose CSRF token it carries)."""
        token = csrf_of((await self.client.get(page)).text)
        return await self.client.post(path, data={"csrf": token, **(data or {})},
                                      headers={"Origin": self.origin, **(headers or {})})
