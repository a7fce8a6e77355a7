"""Start and stop `chute serve` as a subprocess for tests: the real command, on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

LISTENING = re.compile(rb"native protocol listening on (chute://[\d.]+:\d+)")


class ServeProcess:
    """`chute serve` on `data_dir`; `.url` once it listens."""

    def __init__(self, data_dir: str, *extra: str, fsync: str = "always") -> None:
        self.args = [sys.executable, "-m", "chute.cli", "serve", "--data-dir", data_dir, "--port", "0",
                     "--http-port", "-1", "--fsync", fsync, *extra]  # fmt: skip
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: list[bytes] = []
        deadline = time.monotonic() + 60
        self.url = ""
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line)
            found = LISTENING.search(line)
            if found:
                self.url = found.group(1).decode()
                return
        self.process.kill()
        raise RuntimeError("chute serve did not start:\n" + b"".join(self.log).decode(errors="replace"))

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self.process.stderr.close()

    def terminate(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(30)
        finally:
            self.log += self.process.stderr.readlines()
            self.process.stderr.close()
        return code
