"""A real threaded HTTP server on 127.0.0.1 for download tests, with faults injected per path.

    server = FileServer()                       # or the ``file_server`` fixture
    server.add("/files/kl-f8.zip", data)
    server.fault("/files/kl-f8.zip", "drop", after=1000)   # the next GET sends 1000 bytes, then closes
    server.fault("/files/kl-f8.zip", "status", code=500)   # the GET after that answers 500
    server.ignore_range.add("/files/kl-f8.zip")            # always answer 200 with the whole file
    server.throttle = 0.01                                  # seconds between 64 KiB blocks (for kill tests)
    requests made: server.log -> [Request(method, path, range)]

Supports GET and HEAD, Range ``bytes=N-`` and ``bytes=N-M`` (206 with Content-Range, 416 past the end), a strong
ETag per content and If-Range (a stale validator gets the whole file, 200); ``server.etags = False`` hides ETags.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

BLOCK = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class Fault:
    kind: str  # "drop" (close after `after` bytes), "status" (answer `code`), "ignore_range", "stall" (sleep)
    after: int = 0
    code: int = 500
    seconds: float = 0.0


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    ignore_range: set[str] = field(default_factory=set)
    throttle: float = 0.0
    etags: bool = True

    def __post_init__(self) -> None:
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                server._serve(self, body=False)

            def do_GET(self) -> None:
                server._serve(self, body=True)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # clients hanging up are expected here
                pass

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path``; returns the full URL."""
        self.files[path] = data
        return self.url + path

    def fault(self, path: str, kind: str, **params) -> None:
        """Queue a one-shot fault for the next GET of ``path``."""
        with self._lock:
            self._faults[path].append(Fault(kind, **params))

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and r.path == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------------------------------------ internals

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        target = urlsplit(h.path)
        path = target.path + (f"?{target.query}" if target.query else "")
        if path not in self.files:
            path = target.path
        rng = h.headers.get("Range")
        with self._lock:
            self.log.append(Request(h.command, path, rng))
        fault = self._next_fault(path) if body else None
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "status":
            return self._plain(h, fault.code, b"injected failure\n")
        data = self.files.get(path)
        if data is None:
            return self._plain(h, 404, b"not found\n")
        start, end = 0, len(data) - 1
        status = 200
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        if_range = h.headers.get("If-Range")
        ignore = path in self.ignore_range or (fault is not None and fault.kind == "ignore_range") or \
            (if_range is not None and if_range != etag)
        if rng and not ignore:
            try:
                unit, spec = rng.split("=", 1)
                first, _, last = spec.partition("-")
                start = int(first)
                end = int(last) if last else len(data) - 1
            except ValueError:
                return self._plain(h, 400, b"bad range\n")
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            end = min(end, len(data) - 1)
            status = 206
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("Accept-Ranges", "bytes")
        if self.etags:
            h.send_header("ETag", etag)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        if fault is not None and fault.kind == "drop":
            h.send_header("Connection", "close")
        h.end_headers()
        if not body:
            return
        payload = memoryview(data)[start:end + 1]
        limit = fault.after if fault is not None and fault.kind == "drop" else len(payload)
        sent = 0
        try:
            while sent < limit:
                n = min(BLOCK, limit - sent)
                h.wfile.write(payload[sent:sent + n])
                sent += n
                if self.throttle:
                    h.wfile.flush()
                    time.sleep(self.throttle)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
            return
        if limit < len(payload):
            h.close_connection = True  # drop the connection mid-body

    @staticmethod
    def _plain(h: BaseHTTPRequestHandler, code: int, text: bytes) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(text)))
        h.end_headers()
        h.wfile.write(text)


try:
    import pytest
except ImportError:  # pragma: no cover - the server itself needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def file_server():
        """A running :class:`FileServer`, shut down after the test."""
        server = FileServer()
        try:
            yield server
        finally:
            server.close()

    @pytest.fixture
    def mirror(file_server, monkeypatch):
        """``LDM_MIRROR`` pointed at the test server, so every zoo URL is served by it."""
        monkeypatch.setenv("LDM_MIRROR", file_server.url)
        return file_server
