"""Start and stop `chute serve` as a subprocess for tests: the real command, on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

LISTENING = re.compile(rb"native protocol listening on (chute://[\d.]+:\d+)")
HTTP_LISTENING = re.compile(rb"HTTP listening on (http://[\d.]+:\d+)")


class ServeProcess:
    """`chute serve` on `data_dir`; `.url` once it listens (`.http_url` too, with `http_port` 0).

    With `wait=False` the constructor returns at once; `wait_for(pattern)` reads the log up to a line."""

    def __init__(
        self, data_dir: str, *extra: str, fsync: str = "always", http_port: int = -1, wait: bool = True
    ) -> None:
        self.args = [sys.executable, "-m", "chute", "serve", "--data-dir", data_dir, "--port", "0",
                     "--http-port", str(http_port), "--fsync", fsync, *extra]  # fmt: skip
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: list[bytes] = []
        self.url = ""
        self.http_url = ""
        if wait:
            self.url = self.wait_for(LISTENING).group(1).decode()

    @property
    def text(self) -> str:
        """The log read so far."""
        return b"".join(self.log).decode(errors="replace")

    def wait_for(self, pattern: re.Pattern[bytes], timeout_s: float = 60) -> re.Match[bytes]:
        """Read the log up to the first line matching `pattern`; if it never comes, kill the server and raise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if found := HTTP_LISTENING.search(line):
                self.http_url = found.group(1).decode()
            if found := pattern.search(line):
                return found
        self.kill()
        raise RuntimeError(f"chute serve did not log {pattern.pattern!r}:\n{self.text}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self.process.stderr.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig`, wait for the exit, read the rest of the log; the exit status."""
        self.process.send_signal(sig)
        try:
            code = self.process.wait(30)
        finally:
            self.log += self.process.stderr.readlines()
            self.process.stderr.close()
        return code

    def terminate(self) -> int:
        return self.stop(signal.SIGTERM)
