"""A real `celery worker` on Chute's AMQP front (`amqp://guest:guest@127.0.0.1:PORT//`, kombu's py-amqp
transport, remote control and its pidbox queues on): tasks run exactly once, a task retried until it succeeds,
and an acks_late task whose worker is SIGKILLed mid-task runs again on the next worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from chute.testing import running_server

APP = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    from celery import Celery

    app = Celery("chute_amqp_celery_app")
    app.conf.update(
        broker_url=os.environ["TEST_BROKER_URL"],
        result_backend="file://" + os.environ["TEST_RESULTS_DIR"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
    )
    RUNS = Path(os.environ["TEST_RESULTS_DIR"]) / "runs"


    def ran(name):
        with open(RUNS, "a") as file:
            file.write(name + "\\n")


    @app.task
    def add(x, y):
        ran(f"add-{x}-{y}")
        return x + y


    @app.task(bind=True, max_retries=5)
    def flaky(self, name):
        ran(f"flaky-{name}")
        attempts = Path(RUNS).read_text().split().count(f"flaky-{name}")
        if attempts < 3:
            raise self.retry(exc=RuntimeError(f"attempt {attempts} failed"), countdown=0.2)
        return f"{name} ok after {attempts} attempts"


    @app.task(acks_late=True)
    def slow(name):
        ran(f"slow-{name}")
        marker = Path(os.environ["TEST_RESULTS_DIR"]) / f"started-{name}"
        first = not marker.exists()
        marker.write_text("x")
        if first:
            time.sleep(60)  # the test kills the worker meanwhile
        return name
    """
)


def start_worker(tmp_path, env, log_name):
    log = (tmp_path / log_name).open("w")
    command = [sys.executable, "-m", "celery", "-A", "chute_amqp_celery_app", "worker", "--pool", "solo",
               "--loglevel", "INFO", "--hostname", f"w-{log_name}@%h"]  # fmt: skip
    return subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env), log


def stop(process) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.mark.timeout(240)
def test_celery_worker_over_amqp(tmp_path, monkeypatch):
    (tmp_path / "chute_amqp_celery_app.py").write_text(APP)
    results = tmp_path / "results"
    results.mkdir()
    with running_server() as server:
        env = dict(os.environ, TEST_BROKER_URL=server.amqp_url.replace("amqp://", "amqp://guest:guest@") + "/",
                   TEST_RESULTS_DIR=str(results), PYTHONPATH=str(tmp_path))  # fmt: skip
        for name in ("TEST_BROKER_URL", "TEST_RESULTS_DIR"):
            monkeypatch.setenv(name, env[name])
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "chute_amqp_celery_app", raising=False)
        import chute_amqp_celery_app as tasks

        worker, log = start_worker(tmp_path, env, "first.log")
        second = log2 = None
        try:
            handles = [tasks.add.delay(i, i) for i in range(20)]
            assert [h.get(timeout=90) for h in handles] == [2 * i for i in range(20)]
            assert tasks.flaky.delay("job").get(timeout=60) == "job ok after 3 attempts"
            runs = (results / "runs").read_text().split()
            assert sorted(r for r in runs if r.startswith("add-")) == sorted(f"add-{i}-{i}" for i in range(20))

            slow = tasks.slow.delay("once")
            deadline = time.monotonic() + 60
            while not (results / "started-once").exists():
                assert time.monotonic() < deadline, "the slow task never started"
                time.sleep(0.05)
            os.kill(worker.pid, signal.SIGKILL)  # mid-task: not acked (acks_late), so it is delivered again
            worker.wait(10)
            second, log2 = start_worker(tmp_path, env, "second.log")
            assert slow.get(timeout=90) == "once"
            assert (results / "runs").read_text().split().count("slow-once") == 2
        except BaseException:
            stop(worker)
            for name in ("first.log", "second.log"):
                if (tmp_path / name).exists():
                    print(name, (tmp_path / name).read_text()[-6000:])
            raise
        finally:
            stop(worker)
            if second is not None:
                stop(second)
                log2.close()
            log.close()
            tasks.app.pool.force_close_all()  # the producer connections, before the interpreter finds them open
            tasks.app.close()
