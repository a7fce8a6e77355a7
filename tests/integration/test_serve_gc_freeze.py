"""`chute serve` puts what its start-up made out of the garbage collector's reach, twice: the imports before the
server starts, and what the start itself made (recovery, the fronts' modules), once it serves. Otherwise the first
middle collection walks ~20,000 start-up objects while clients are served: a 9-21 ms hold in soaks (issue 12).

Run in a child process: a freeze is process-wide, and this test process must keep its collector as it is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

CHILD = r"""
import asyncio, gc, json, os, signal, sys
serve = sys.modules.get("chute.cli.serve") or __import__("importlib").import_module("chute.cli.serve")
from chute.server import load_config

data_dir, pidfile = sys.argv[1], sys.argv[2]
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "start" and info["generation"] == 2 else None)
config = load_config(None, data_dir=data_dir, port=0, http_port=0, amqp_port=0)

async def main():
    serving = asyncio.ensure_future(serve._serve(config, pidfile))
    while not os.path.exists(pidfile):  # written once the server has started
        await asyncio.sleep(0.01)
    print(json.dumps({"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count(), "full": len(full)}),
          flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the server's own handler stops it
    await serving

asyncio.run(main())
"""


def test_once_serving_what_the_start_made_is_out_of_the_collectors_reach(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "data"), str(tmp_path / "pid")],
                          capture_output=True, text=True, timeout=50)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[0])
    # what the collector still walks is what serving made so far (a few hundred objects), not the ~20,000 the
    # start made (the HTTP app, the AMQP and SQS fronts' modules), frozen with the imports before it
    assert seen["tracked"] < 5_000, seen
    assert seen["frozen"] > 50_000, seen
    # one full collection, before the server starts: the second freeze, once it listens, does not collect (that
    # held the loop 6-16 ms and found no garbage)
    assert seen["full"] == 1, seen
