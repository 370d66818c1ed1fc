"""The client's login profiles: one JSON file, ``$MMANAGER_CONFIG`` or
``${XDG_CONFIG_HOME:-~/.config}/mmanager/config.json``, shaped
``{"current": "default", "profiles": {"<name>": {"url": ..., "token": ...}}}``.

Invariant: the file is only ever replaced whole (written beside it, then renamed over it), with mode 0600
from its creation on, so a reader never sees half a file and nobody else can read the tokens in it.
``MMANAGER_HUB_URL`` and ``MMANAGER_TOKEN`` override the current profile (``resolve``: a token is never sent
to a hub other than the one it was given for); a profile named (``profile=``, ``MMANAGER_PROFILE``) keeps its
own URL and token unless both variables are set. A URL is used only once it is checked (``check_url``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mmanager.client.errors import ApiError

DEFAULT_PROFILE = "default"


def path() -> Path:
    explicit = os.environ.get("MMANAGER_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "mmanager" / "config.json"


def load(at: Path | None = None) -> dict[str, Any]:
    """The configuration; an empty one (no profiles) when there is no file yet."""
    at = at or path()
    try:
        data = json.loads(at.read_text())
    except FileNotFoundError:
        return {"current": DEFAULT_PROFILE, "profiles": {}}
    except (OSError, ValueError) as exc:
        raise ApiError(0, "CONFIG_UNREADABLE", f"cannot read {at}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("profiles", {}), dict):
        raise ApiError(0, "CONFIG_UNREADABLE", f"{at} is not a mmanager configuration")
    data.setdefault("current", DEFAULT_PROFILE)
    data.setdefault("profiles", {})
    return data


def save(data: dict[str, Any], at: Path | None = None) -> Path:
    """Replace the file with ``data`` atomically, mode 0600 (its folder 0700 when made here)."""
    at = at or path()
    at.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp creates the file 0600: the tokens are never readable by others, not even for a moment.
    fd, temporary = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=at.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, at)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return at


def save_profile(name: str, url: str, token: str, make_current: bool = True, at: Path | None = None) -> Path:
    data = load(at)
    data["profiles"][name] = {"url": url.rstrip("/"), "token": token}
    if make_current:
        data["current"] = name
    return save(data, at)


def resolve(url: str | None = None, token: str | None = None,
            profile: str | None = None) -> tuple[str, str | None]:
    """The hub URL and token a client uses. The URL: the argument, else ``MMANAGER_HUB_URL``, else the
    profile's (``profile``, else ``MMANAGER_PROFILE``, else the configuration's current one). The token comes
    from the URL's own level or a more explicit one, never a less explicit one: with a ``url`` argument only
    the ``token`` argument; with ``MMANAGER_HUB_URL`` the argument or ``MMANAGER_TOKEN``; with the profile's
    URL any of the three. A profile's token also goes with another level's URL that is the profile's own
    URL; otherwise it is never sent to a hub other than the one it was saved for. No such token: None.

    A profile named (``profile`` or ``MMANAGER_PROFILE``) is asked for by name: the environment's URL and
    token are left out for it unless both are set (then both are used, as a CI job sets them), so that a
    ``MMANAGER_TOKEN`` exported for one hub never goes to the named profile's hub, and a ``MMANAGER_HUB_URL``
    never takes that profile's token elsewhere. The URL chosen must be an http or https URL (``check_url``:
    ``INVALID_URL`` otherwise)."""
    named = profile or os.environ.get("MMANAGER_PROFILE") or None
    env = (_bare(os.environ.get("MMANAGER_HUB_URL")), os.environ.get("MMANAGER_TOKEN") or None)
    if named and not all(env):
        env = (None, None)
    levels = [(_bare(url), token or None), env]
    sources = ["the url argument", "MMANAGER_HUB_URL"]
    explicit = next((level for level, (at, _) in enumerate(levels) if at), None)
    if explicit is None or not any(secret for _, secret in levels[:explicit + 1]):
        # The profile gives the URL, or may hold the token of the URL given.
        data = load()
        chosen_name = named or data["current"]
        entry = data["profiles"].get(chosen_name)
        if entry is None and named:
            raise ApiError(0, "PROFILE_NOT_FOUND", f"no login profile {named!r} in {path()}")
        if isinstance(entry, dict):
            levels.append((_bare(entry.get("url")), entry.get("token") or None))
            sources.append(f"the URL of login profile {chosen_name!r}")
    chosen = next((level for level, (at, _) in enumerate(levels) if at), None)
    if chosen is None:
        raise ApiError(0, "NOT_CONFIGURED",
                       "no hub URL: pass url=, set MMANAGER_HUB_URL, or log in with 'mmanager login'")
    hub = levels[chosen][0]
    assert hub is not None
    check_url(hub, sources[chosen])
    # A token set at the URL's level or above was meant for whatever URL it is used with; one below it only
    # for its own level's URL (a profile's token is that hub's, not MMANAGER_HUB_URL's).
    found = next((secret for level, (at, secret) in enumerate(levels)
                  if secret and (level <= chosen or at == hub)), None)
    return hub, found


def check_url(url: str, source: str = "the hub URL") -> str:
    """``url`` when a client can call it: ``http://`` or ``https://`` and a host (a port, if any, in range).
    Otherwise ``ApiError`` ``INVALID_URL`` saying what is wrong, and where the URL came from (``source``)."""
    import httpx

    def refuse(why: str) -> ApiError:
        return ApiError(0, "INVALID_URL", f"{source} {url!r}: {why}")

    if "://" not in url:
        if url.lower().startswith(("http:", "https:")):
            raise refuse("not a URL: give http://host:port or https://host")
        raise refuse(f"the scheme is missing: give http:// or https://, e.g. http://{url}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise refuse(f"not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise refuse(f"the scheme is {parsed.scheme!r}: a hub is reached over http:// or https://")
    if not parsed.host:
        raise refuse("no host in it")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise refuse(f"port {parsed.port} is out of range")
    return url


def _bare(url: str | None) -> str | None:
    return url.rstrip("/") or None if url else None
