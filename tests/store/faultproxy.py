"""A TCP proxy on 127.0.0.1 whose behaviour a test switches, to put faults between a client and
a server (here: the store and the moto S3 server).

Modes:

- ``"pass"``: bytes go through both ways;
- ``"black-hole"``: connections are accepted and never answered (what a stuck server or a
  firewall that drops replies looks like);
- ``"refuse"``: the listening socket is closed, so new connections are refused;
- ``"reset"``: connections are accepted and reset at once.

Switching modes resets every connection already open, so a client's pooled keep-alive
connections see the fault too. :meth:`FaultProxy.fault` switches to a fault mode for a while
and back to ``"pass"`` afterwards, from a timer thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from typing import Literal

Mode = Literal["pass", "black-hole", "refuse", "reset"]
_POLL_S = 0.05
_CHUNK = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Pipe:
    """One proxied connection: two pump threads, cut on request."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self._socks = (client, upstream)
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._pumps_left = 2
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def cut(self) -> None:
        """Reset both sides (the pumps do it within a poll interval)."""
        self._cut.set()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._cut.is_set():
                if not select.select([src], [], [], _POLL_S)[0]:
                    continue
                data = src.recv(_CHUNK)
                if not data:  # half-close: pass the FIN on, keep the other direction
                    dst.shutdown(socket.SHUT_WR)
                    break
                dst.sendall(data)
        except OSError:
            self._cut.set()
        with self._lock:
            self._pumps_left -= 1
            if self._pumps_left:
                return
        for sock in self._socks:
            if self._cut.is_set():
                _reset(sock)
            else:
                sock.close()


class FaultProxy:
    """Listens on ``127.0.0.1:port`` and forwards to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._lock = threading.Lock()
        self._mode: Mode = "pass"
        self._pipes: list[_Pipe] = []
        self._held: list[socket.socket] = []  # black-holed connections
        self._listener: socket.socket | None = None
        self._closed = False
        self._timer: threading.Timer | None = None
        self.port = 0
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        """Switch now; connections already open are reset."""
        with self._lock:
            self._mode = mode
            pipes, self._pipes = self._pipes, []
            held, self._held = self._held, []
            listener = self._listener if mode == "refuse" else None
            if listener is not None:
                self._listener = None
        for pipe in pipes:
            pipe.cut()
        for sock in held:
            _reset(sock)
        if listener is not None:
            listener.close()  # the accept loop notices within a poll interval
        if mode != "refuse" and self._listener is None and not self._closed:
            self._listen()

    def fault(self, mode: Mode, seconds: float) -> None:
        """Switch to ``mode`` now and back to ``"pass"`` after ``seconds``."""
        self.set_mode(mode)
        self._timer = threading.Timer(seconds, self.set_mode, args=("pass",))
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._closed = True
        self.set_mode("refuse")

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))  # port 0 the first time, the same one after
        listener.listen(64)
        listener.settimeout(_POLL_S)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed under us
                return
            client.settimeout(None)
            mode = self._mode
            if mode == "black-hole":
                with self._lock:
                    self._held.append(client)
            elif mode == "pass":
                try:
                    upstream = socket.create_connection(self._target, timeout=5)
                except OSError:
                    _reset(client)
                    continue
                upstream.settimeout(None)
                with self._lock:
                    self._pipes.append(_Pipe(client, upstream))
            else:
                _reset(client)
