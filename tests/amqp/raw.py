"""A raw AMQP 0-9-1 client over a socket, built on pamqp: for tests that must send what no library would."""

from __future__ import annotations

import contextlib
import socket
import time

from pamqp import commands, frame

from chute.amqp.connection import PROTOCOL_HEADER


class Raw:
    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def method(self, channel: int, method) -> None:
        self.send(frame.marshal(method, channel))

    def read(self):
        """The next (channel, frame) from the server; None once the server closed the connection."""
        while True:
            if self.buffer:
                try:
                    used, channel, value = frame.unmarshal(self.buffer)
                except Exception:
                    used = 0
                if used:
                    self.buffer = self.buffer[used:]
                    return channel, value
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self.buffer += data

    def expect(self, kind):
        got = self.read()
        assert got is not None and isinstance(got[1], kind), f"expected {kind.__name__}, got {got!r}"
        return got[1]

    def handshake(self, *, heartbeat: int = 0, user: str = "guest", password: str = "guest",
                  capabilities: dict | None = None) -> None:  # fmt: skip
        self.send(PROTOCOL_HEADER)
        self.expect(commands.Connection.Start)
        properties = {"product": "raw", "capabilities": capabilities or {}}
        self.method(0, commands.Connection.StartOk(client_properties=properties, mechanism="PLAIN",
                                                   response=f"\0{user}\0{password}", locale="en_US"))  # fmt: skip
        tune = self.expect(commands.Connection.Tune)
        self.method(0, commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max,
                                                  heartbeat=heartbeat))  # fmt: skip
        self.method(0, commands.Connection.Open(virtual_host="/"))
        self.expect(commands.Connection.OpenOk)
        self.method(1, commands.Channel.Open())
        self.expect(commands.Channel.OpenOk)

    def close_reason(self, timeout_s: float = 10.0):
        """Read until the server closes: the reply code of its connection.close (None if it sent none)."""
        code = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.read()
            if got is None:
                return code
            if isinstance(got[1], commands.Connection.Close):
                code = got[1].reply_code
                with contextlib.suppress(OSError):  # we may have shut our side already
                    self.method(0, commands.Connection.CloseOk())
        raise AssertionError("the server did not close the connection")

    def close(self) -> None:
        self.sock.close()
