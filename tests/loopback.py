"""A tiny HTTP file server on 127.0.0.1 for tests, with switches for the failures a download must survive."""

from __future__ import annotations

import base64
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-")


class FileServer:
    """Serve `files` (URL path without the leading slash -> content) on a free loopback port."""

    url: str
    requests: list[dict[str, Any]]
    drop_after: dict[str, int]
    fail_first: dict[str, int]
    ignore_range: bool = False

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        drop_after: dict[str, int] | None = None,
        fail_first: dict[str, int] | None = None,
        ignore_range: bool = False,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        # Kept by reference: a test may change the served content between requests.
        self.files = files
        self.requests = []
        # path -> send this many body bytes, then close (Content-Length still announces the full body);
        # only the first reply of that path that carries a body is cut short.
        self.drop_after = dict(drop_after or {})
        # path -> answer this many first requests of that path with 503.
        self.fail_first = dict(fail_first or {})
        self.ignore_range = ignore_range
        # (user, password): requests without that HTTP Basic header get 401
        self.basic_auth = basic_auth
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._dropped: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FileServer:
        """Start serving in a daemon thread."""
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}/"
        # A short poll interval: shutdown() waits up to one interval, and tests start many servers.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _reply(
        self, path: str, range_header: str | None, with_body: bool, authorization: str | None = None
    ) -> tuple[int, dict[str, str], bytes, int | None]:
        """(status, headers, body, bytes to send before dropping or None) for one request, and log it."""
        with self._lock:
            count = self._seen[path] = self._seen.get(path, 0) + 1
            content = self.files.get(path)
            if self.basic_auth is not None and authorization != _basic(*self.basic_auth):
                status, headers, body = 401, {"WWW-Authenticate": 'Basic realm="test"'}, b"who are you\n"
            else:
                status, headers, body = self._answer(path, count, content, range_header)
            cut = None
            if with_body and body and path in self.drop_after and path not in self._dropped:
                self._dropped.add(path)
                cut = self.drop_after[path]
            self.requests.append({"path": path, "range": range_header, "status": status})
        return status, headers, body, cut

    def _answer(
        self, path: str, count: int, content: bytes | None, range_header: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if content is None:
            return 404, {}, b"not found\n"
        if count <= self.fail_first.get(path, 0):
            return 503, {}, b"busy\n"
        size = len(content)
        match = _RANGE.fullmatch(range_header.strip()) if range_header else None
        if match is None or self.ignore_range:
            return 200, {}, content
        start = int(match.group(1))
        if start >= size:
            return 416, {"Content-Range": f"bytes */{size}"}, b""
        return 206, {"Content-Range": f"bytes {start}-{size - 1}/{size}"}, content[start:]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-body is part of what the tests exercise, not an error to print.
        pass


def _handler_for(owner: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._respond(send_body=True)

        def do_HEAD(self) -> None:
            self._respond(send_body=False)

        def _respond(self, send_body: bool) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
            status, headers, body, cut = owner._reply(
                path, self.headers.get("Range"), send_body, self.headers.get("Authorization")
            )
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if send_body:
                self.wfile.write(body if cut is None else body[:cut])
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
