"""A real Celery app on kombu's SQS transport (`sqs://key:secret@127.0.0.1:PORT`) against a live server: a
`celery worker` subprocess runs tasks sent by the test — one that succeeds, one that fails twice and is retried
until it succeeds, and one that always fails — and the test reads their results (a file result backend, since
SQS carries no results). Once with auth off, once with auth on (the worker signs with a user's access key)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from urllib.parse import quote

import pytest

from tests.sqs.compat_support import ACCESS_KEY, SECRET_KEY, TARGET, sqs_endpoint

APP = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from celery import Celery

    app = Celery("chute_celery_test")
    app.conf.update(
        broker_url=os.environ["TEST_BROKER_URL"],
        broker_transport_options={
            "region": "us-east-1", "is_secure": False, "queue_name_prefix": "celery-test-",
            "polling_interval": 0.2, "wait_time_seconds": 1, "visibility_timeout": 60,
        },
        result_backend="file://" + os.environ["TEST_RESULTS_DIR"],
        task_default_queue="work",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    ATTEMPTS = Path(os.environ["TEST_RESULTS_DIR"]) / "attempts"


    @app.task
    def add(x, y):
        return x + y


    @app.task(bind=True, max_retries=5)
    def flaky(self, name):
        counter = ATTEMPTS.with_name(f"attempts-{name}")
        attempts = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(attempts))
        if attempts < 3:
            raise self.retry(exc=RuntimeError(f"attempt {attempts} failed"), countdown=0.2)
        return f"{name} ok after {attempts} attempts"


    @app.task
    def broken():
        raise ValueError("always broken")
    """
)


# With auth on, the worker signs with a user's access key whose grants cover only the app's queues; the secret has
# characters that must be URL-encoded in the broker URL.
AUTH_KEY_ID = "AKCHCELERYTEST"
AUTH_SECRET = "s3cr/t+with=chars"


@pytest.fixture(params=["auth-off", "auth-on"])
def celery_env(request, tmp_path):
    from chute.server.users import AccessKey, Grant, User

    (tmp_path / "chute_celery_app.py").write_text(APP)
    results = tmp_path / "results"
    results.mkdir()
    key, secret, options = ACCESS_KEY, SECRET_KEY, {}
    if request.param == "auth-on":
        if TARGET == "moto":
            pytest.skip("moto does not verify signatures")
        key, secret = AUTH_KEY_ID, AUTH_SECRET
        grant = Grant(allow=["publish", "consume", "manage"], queues="celery-test-*")
        options["users"] = [User(name="celery", access_keys=[AccessKey(id=key, secret=secret)], grants=[grant])]
    with sqs_endpoint(**options) as url:
        host_port = url.removeprefix("http://")
        env = {
            "TEST_BROKER_URL": f"sqs://{quote(key, safe='')}:{quote(secret, safe='')}@{host_port}",
            "TEST_RESULTS_DIR": str(results),
            "PYTHONPATH": str(tmp_path),
        }
        yield env


@pytest.fixture
def worker(celery_env, tmp_path, monkeypatch):
    for name, value in celery_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = (tmp_path / "worker.log").open("w")
    command = [sys.executable, "-m", "celery", "-A", "chute_celery_app", "worker", "--pool", "solo",
               "--concurrency", "1", "--without-mingle", "--without-gossip", "--without-heartbeat",
               "--loglevel", "INFO", "--queues", "work"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@pytest.mark.timeout(240)
def test_celery_worker_runs_tasks_through_sqs(worker, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "chute_celery_app", raising=False)  # each test's app has its own broker URL
    import chute_celery_app as tasks

    try:
        assert tasks.add.delay(2, 3).get(timeout=90) == 5
        results = [tasks.add.delay(i, i) for i in range(20)]
        assert [r.get(timeout=60) for r in results] == [2 * i for i in range(20)]
        assert tasks.flaky.delay("job").get(timeout=60) == "job ok after 3 attempts"
        failing = tasks.broken.delay()
        with pytest.raises(ValueError, match="always broken"):
            failing.get(timeout=60)
        assert failing.state == "FAILURE"
    except BaseException:
        worker.terminate()
        worker.wait(20)
        print((tmp_path / "worker.log").read_text()[-8000:])
        raise
    finally:
        tasks.app.close()
    assert worker.poll() is None, "the worker stays up through failing tasks"
