"""A model replica stand-in for the gateway's tests: ``python -m tests.support.echo_backend PORT NAME``.

HTTP/1.1 with keep-alive, one thread per connection. ``/health`` answers 200 (503 after
``/admin/unhealthy``); anything else answers JSON with this replica's name, the path and query it
received, the body's length and the headers a test looks at; ``/slow...`` after a second.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo"
    # Headers and body go out in two writes: without this, Nagle holds the body for the client's delayed ACK.
    disable_nagle_algorithm = True
    healthy = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        body = self._body()
        if self.path == "/health":
            self._answer(200 if Handler.healthy else 503, {"ok": Handler.healthy})
            return
        if self.path == "/admin/unhealthy":
            Handler.healthy = False
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        self._answer(200, {"server": self.server.name, "path": self.path, "body": len(body),  # type: ignore[attr-defined]
                           "authorization": self.headers.get("Authorization"),
                           "prefix": self.headers.get("X-Forwarded-Prefix")})

    do_POST = do_GET
    do_PUT = do_GET


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    server = Server(("127.0.0.1", port), Handler)
    server.name = name  # type: ignore[attr-defined]
    server.serve_forever()


if __name__ == "__main__":
    main()
