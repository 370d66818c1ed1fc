#!/bin/sh
# The hub image's entrypoint: wait for the database, apply the migrations, serve.
#   MMANAGER_DATABASE_URL   where the database is (required here: the image has no SQLite default worth keeping)
#   MMANAGER_DB_WAIT        seconds to wait for it to accept connections (default 60)
# Arguments go to `mmanager hub serve` (default: --host 0.0.0.0 --port 8000); a first argument that
# is not an option runs that command instead (e.g. `docker run … mmanager users create alice --admin`).
set -eu

case "${1:-}" in
    ""|-*) ;;
    *) exec "$@" ;;
esac

: "${MMANAGER_DATABASE_URL:?set MMANAGER_DATABASE_URL (postgresql+asyncpg://user:password@host:5432/mmanager)}"

python3 - <<'PY'
import asyncio, os, sys, time

import asyncpg
from sqlalchemy.engine import make_url

url = make_url(os.environ["MMANAGER_DATABASE_URL"])
if not url.drivername.startswith("postgresql"):
    sys.exit(0)  # SQLite: nothing to wait for
deadline = time.monotonic() + float(os.environ.get("MMANAGER_DB_WAIT", "60"))
dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


async def attempt() -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    await conn.close()


while True:
    try:
        asyncio.run(attempt())
        print(f"database {where} is up", file=sys.stderr)
        break
    except Exception as exc:  # refused, starting up, DNS not there yet…
        if time.monotonic() > deadline:
            # The password never goes to the log: only the host, port, database and error class.
            print(f"database {where} did not answer in time: {type(exc).__name__}", file=sys.stderr)
            sys.exit(1)
        print(f"waiting for database {where} ({type(exc).__name__})", file=sys.stderr)
        time.sleep(1)
PY

mmanager db upgrade
# Migrated above; serving need not try again.
exec mmanager hub serve --no-migrate "$@"
