"""The AWS CLI (`aws sqs ... --endpoint-url`) against a live server: create a queue, send with attributes, receive,
change visibility, delete, batch, attributes, tags, purge, list and delete the queue; an error exits non-zero with
AWS's code on stderr. With auth on, the CLI signs with a user's access key: a wrong secret and a queue outside the
user's grants are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sqs.compat_support import TARGET, aws_cli_env, sqs_endpoint

AWS = Path(sys.executable).parent / "aws"

pytestmark = pytest.mark.skipif(not AWS.exists(), reason="the aws command is not installed next to python")


@pytest.fixture
def aws(tmp_path):
    env = aws_cli_env(tmp_path)
    with sqs_endpoint() as url:

        def run(*args: str, check: bool = True) -> dict | subprocess.CompletedProcess:
            command = [str(AWS), "sqs", *args, "--endpoint-url", url, "--output", "json"]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
            if not check:
                return done
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout) if done.stdout.strip() else {}

        yield run


@pytest.mark.timeout(300)
def test_aws_cli_drives_a_queue(aws):
    url = aws("create-queue", "--queue-name", "cli-jobs", "--attributes", "VisibilityTimeout=30")["QueueUrl"]
    assert url.endswith("/cli-jobs")
    assert aws("get-queue-url", "--queue-name", "cli-jobs")["QueueUrl"] == url
    sent = aws("send-message", "--queue-url", url, "--message-body", "hello from the cli",
               "--message-attributes", '{"kind": {"DataType": "String", "StringValue": "greeting"}}')  # fmt: skip
    assert len(sent["MD5OfMessageBody"]) == 32
    got = aws("receive-message", "--queue-url", url, "--attribute-names", "All", "--message-attribute-names", "All",
              "--wait-time-seconds", "2")["Messages"]  # fmt: skip
    assert [m["Body"] for m in got] == ["hello from the cli"]
    assert got[0]["MessageAttributes"]["kind"]["StringValue"] == "greeting"
    assert got[0]["Attributes"]["ApproximateReceiveCount"] == "1"
    aws("change-message-visibility", "--queue-url", url, "--receipt-handle", got[0]["ReceiptHandle"],
        "--visibility-timeout", "60")  # fmt: skip
    aws("delete-message", "--queue-url", url, "--receipt-handle", got[0]["ReceiptHandle"])

    entries = json.dumps([{"Id": f"e{i}", "MessageBody": f"batch {i}"} for i in range(3)])
    assert len(aws("send-message-batch", "--queue-url", url, "--entries", entries)["Successful"]) == 3
    attributes = aws("get-queue-attributes", "--queue-url", url, "--attribute-names", "All")["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "3"
    aws("set-queue-attributes", "--queue-url", url, "--attributes", "DelaySeconds=2")
    assert aws("get-queue-attributes", "--queue-url", url, "--attribute-names", "DelaySeconds")["Attributes"] == {
        "DelaySeconds": "2"
    }
    aws("tag-queue", "--queue-url", url, "--tags", "team=a")
    assert aws("list-queue-tags", "--queue-url", url)["Tags"] == {"team": "a"}
    aws("purge-queue", "--queue-url", url)
    assert url in aws("list-queues", "--queue-name-prefix", "cli-")["QueueUrls"]
    aws("delete-queue", "--queue-url", url)

    failed = aws("get-queue-url", "--queue-name", "cli-jobs", check=False)
    assert failed.returncode != 0
    assert "QueueDoesNotExist" in failed.stderr or "NonExistentQueue" in failed.stderr


@pytest.mark.skipif(TARGET == "moto", reason="moto does not verify signatures")
def test_aws_cli_with_an_access_key_when_auth_is_on(tmp_path):
    from chute.server.users import AccessKey, Grant, User

    user = User(name="cli", access_keys=[AccessKey(id="AKCHCLI", secret="cli-secret")],
                grants=[Grant(allow=["publish", "consume", "manage"], queues="cli-*")])  # fmt: skip
    with sqs_endpoint(users=[user]) as url:
        env = aws_cli_env(tmp_path) | {"AWS_ACCESS_KEY_ID": "AKCHCLI", "AWS_SECRET_ACCESS_KEY": "cli-secret"}

        def run(*args: str, **overrides: str) -> subprocess.CompletedProcess:
            command = [str(AWS), "sqs", *args, "--endpoint-url", url, "--output", "json"]
            return subprocess.run(command, env=env | overrides, capture_output=True, text=True, timeout=60)

        created = run("create-queue", "--queue-name", "cli-signed")
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["QueueUrl"].endswith("/cli-signed")
        wrong = run("list-queues", AWS_SECRET_ACCESS_KEY="not-the-secret")
        assert wrong.returncode != 0 and "SignatureDoesNotMatch" in wrong.stderr
        denied = run("create-queue", "--queue-name", "billing")
        assert denied.returncode != 0 and "AccessDenied" in denied.stderr
