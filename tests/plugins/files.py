"""A Range-capable HTTP file server fixture (``file_server``) and a deploy command pointing at it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.protocol import DeployCommand

__all__ = ["FileServer", "file_server", "file_url", "deploy_command"]


class FileServer(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    ranges: list[str | None]
    cut_first: set[str]  # paths whose first full response stops halfway (a dropped connection)


class _RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not rng and self.path in self.server.cut_first:
            self.server.cut_first.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def file_server() -> Iterator[FileServer]:
    srv = FileServer(("127.0.0.1", 0), _RangeHandler)
    srv.files, srv.ranges, srv.cut_first = {}, [], set()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def file_url(srv: FileServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def deploy_command(srv: FileServer, bundle: Path, job: str, version: str, *, sha: str | None = None) -> DeployCommand:
    data = bundle.read_bytes()
    srv.files[f"/{bundle.name}"] = data
    return DeployCommand(job_id=job, name="tiny-mlp", version=version, size=len(data),
                         sha256=sha or hashlib.sha256(data).hexdigest(), url=file_url(srv, f"/{bundle.name}"))
