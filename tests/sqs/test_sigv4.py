"""SigV4 verification against signatures made by botocore for real SQS requests, captured just before they would
be sent: a right secret passes; a wrong secret, a tampered body, path, query or signed header, a stale or future
date and a malformed header are refused with AWS's error codes. End to end, on a server with access keys: boto3
over both protocols is verified and mapped to the key's user (a wrong secret, an unknown key, a queue outside the
user's grants and an unsigned request are refused)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import boto3
import botocore.auth
import botocore.credentials
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from chute.server.sqs import sigv4
from chute.server.sqs.errors import SqsError

ACCESS_KEY = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


class Captured(Exception):
    """Raised by the before-send hook to stop botocore from sending the signed request."""

    def __init__(self, request) -> None:
        self.request = request


def capture(call) -> dict:
    """The request boto3 signs for `call(client)`: method, raw path, raw query, headers, body."""
    client = boto3.client(
        "sqs", region_name="eu-west-3", endpoint_url="http://127.0.0.1:9324",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
        config=Config(retries={"max_attempts": 1}),
    )  # fmt: skip

    def stop(request, **kwargs):
        raise Captured(request)

    client.meta.events.register("before-send.sqs.*", stop)
    with pytest.raises(Captured) as caught:
        call(client)
    request = caught.value.request
    url = urlsplit(request.url)
    body = request.body or b""
    body = body.encode() if isinstance(body, str) else bytes(body)
    headers = {name: value.decode() if isinstance(value, bytes) else value for name, value in request.headers.items()}
    headers["Host"] = url.netloc
    return {"method": request.method, "path": url.path or "/", "query": url.query, "headers": headers, "body": body}


def check(request: dict, secret: str = SECRET, now: float | None = None) -> sigv4.Credential:
    return sigv4.verify(
        request["method"], request["path"], request["query"], request["headers"], request["body"], secret, now=now
    )


@pytest.fixture
def send_message() -> dict:
    return capture(lambda c: c.send_message(QueueUrl="http://127.0.0.1:9324/000000000000/jobs", MessageBody="hi é"))


def test_botocore_signature_verifies_and_names_the_signer(send_message):
    credential = check(send_message)
    assert credential.access_key_id == ACCESS_KEY
    assert credential.region == "eu-west-3"
    assert credential.service == "sqs"
    assert "host" in credential.signed_headers and "x-amz-date" in credential.signed_headers
    assert sigv4.access_key_id(send_message["headers"]) == ACCESS_KEY


def test_every_action_shape_verifies():
    url = "http://127.0.0.1:9324/000000000000/jobs"
    calls = [
        lambda c: c.list_queues(QueueNamePrefix="a b/c", MaxResults=5),
        lambda c: c.create_queue(QueueName="q.fifo", Attributes={"FifoQueue": "true"}, tags={"k": "v w"}),
        lambda c: c.send_message_batch(QueueUrl=url, Entries=[{"Id": "1", "MessageBody": "x" * 3000}]),
        lambda c: c.receive_message(QueueUrl=url, WaitTimeSeconds=20, MessageAttributeNames=["All"]),
    ]
    for call in calls:
        assert check(capture(call)).access_key_id == ACCESS_KEY


def test_a_query_string_and_an_odd_path_are_canonicalized_like_botocore():
    request = AWSRequest(
        method="POST", url="http://127.0.0.1:9324/000000000000/my%20queue/./x?b=2&a=1%2F3&a=0&empty=",
        data=b"Action=ListQueues&Version=2012-11-05",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )  # fmt: skip
    signer = botocore.auth.SigV4Auth(botocore.credentials.Credentials(ACCESS_KEY, SECRET), "sqs", "us-east-1")
    signer.add_auth(request)
    url = urlsplit(request.url)
    headers = dict(request.headers) | {"Host": url.netloc}
    sigv4.verify("POST", url.path + "?" + url.query, None, headers, request.body, SECRET)
    decoded = [("b", "2"), ("a", "1/3"), ("a", "0"), ("empty", "")]
    sigv4.verify("POST", url.path, decoded, headers, request.body, SECRET)


def test_a_session_token_header_is_part_of_the_signature():
    request = AWSRequest(method="POST", url="http://localhost:4566/", data=b"{}")
    credentials = botocore.credentials.Credentials(ACCESS_KEY, SECRET, token="session-token")
    botocore.auth.SigV4Auth(credentials, "sqs", "us-east-1").add_auth(request)
    headers = dict(request.headers) | {"Host": "localhost:4566"}
    sigv4.verify("POST", "/", "", headers, b"{}", SECRET)
    with pytest.raises(SqsError) as error:
        sigv4.verify("POST", "/", "", headers | {"X-Amz-Security-Token": "other"}, b"{}", SECRET)
    assert error.value.code == "SignatureDoesNotMatch"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda r: r, id="wrong-secret"),
        pytest.param(lambda r: r | {"body": r["body"].replace(b"hi", b"ho")}, id="body"),
        pytest.param(lambda r: r | {"body": r["body"] + b" "}, id="body-appended"),
        pytest.param(lambda r: r | {"path": "/000000000000/other"}, id="path"),
        pytest.param(lambda r: r | {"query": "x=1"}, id="query"),
        pytest.param(lambda r: r | {"method": "PUT"}, id="method"),
        pytest.param(lambda r: r | {"headers": r["headers"] | {"Host": "evil:1"}}, id="host"),
        pytest.param(lambda r: r | {"headers": r["headers"] | {"X-Amz-Target": "AmazonSQS.DeleteQueue"}},
                     id="signed-header"),
    ],
)  # fmt: skip
def test_a_tampered_request_does_not_match(send_message, tamper, request):
    secret = "not-the-secret" if request.node.callspec.id == "wrong-secret" else SECRET
    with pytest.raises(SqsError) as error:
        check(tamper(send_message), secret)
    assert error.value.code == "SignatureDoesNotMatch"
    assert error.value.status == 403


def test_a_signature_from_more_than_15_minutes_ago_or_ahead_is_refused(send_message):
    now = time.time()
    check(send_message, now=now + 14 * 60)
    for skew_s in (16 * 60, -16 * 60):
        with pytest.raises(SqsError) as error:
            check(send_message, now=now + skew_s)
        assert error.value.code == "SignatureDoesNotMatch"
        assert "Signature expired" in error.value.message or "not yet current" in error.value.message


def test_malformed_authorization_is_an_incomplete_signature(send_message):
    headers = send_message["headers"]
    broken = {
        "none": None,
        "sigv2": "AWS AKID:c2lnbmF0dXJl",
        "no-signature": headers["Authorization"].split(", Signature=")[0],
        "bad-scope": headers["Authorization"].replace("/sqs/aws4_request", "/sqs"),
    }
    for name, value in broken.items():
        changed = {k: v for k, v in headers.items() if k != "Authorization"}
        if value is not None:
            changed["Authorization"] = value
        with pytest.raises(SqsError) as error:
            check(send_message | {"headers": changed})
        assert error.value.code == "IncompleteSignature", name
        assert error.value.status == 400
    assert sigv4.access_key_id({"Authorization": "AWS AKID:c2ln"}) is None


def test_a_request_without_a_date_is_incomplete(send_message):
    headers = {k: v for k, v in send_message["headers"].items() if k.lower() != "x-amz-date"}
    with pytest.raises(SqsError) as error:
        check(send_message | {"headers": headers})
    assert error.value.code == "IncompleteSignature"


def test_the_signing_key_matches_the_aws_documentation_example():
    # The worked example of AWS's "Deriving the signing key" (secret, 20120215, us-east-1, iam).
    key = sigv4.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


# -- end to end: a server with access keys ----------------------------------------------------------------------


@pytest.fixture
def secured(tmp_path):
    """A server with auth on: `app` may use queues `app-*` only; `admin` is a superuser."""
    from chute.server.users import AccessKey, Grant, User
    from tests.sqs.compat_support import running_server

    users = [
        User(name="app", access_keys=[AccessKey(id="AKCHAPP", secret="app-secret")],
             grants=[Grant(allow=["publish", "consume", "manage"], queues="app-*")]),
        User(name="admin", superuser=True, access_keys=[AccessKey(id="AKCHADMIN", secret="admin-secret")]),
    ]  # fmt: skip
    with running_server(users=users) as server:
        yield f"http://127.0.0.1:{server.http_port}"


def signed_client(endpoint: str, key: str, secret: str, tmp_path=None):
    from tests.sqs.compat_support import query_client

    if tmp_path is not None:
        return query_client(endpoint, tmp_path, access_key=key, secret_key=secret)
    return boto3.client("sqs", region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id=key,
                        aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1}))  # fmt: skip


@pytest.mark.parametrize("protocol", ["json", "query"])
def test_access_keys_are_verified_and_mapped_to_users(secured, protocol, tmp_path):
    from botocore.exceptions import ClientError

    directory = tmp_path if protocol == "query" else None
    app = signed_client(secured, "AKCHAPP", "app-secret", directory)
    url = app.create_queue(QueueName="app-jobs")["QueueUrl"]
    app.send_message(QueueUrl=url, MessageBody="signed")
    assert app.receive_message(QueueUrl=url, WaitTimeSeconds=1)["Messages"][0]["Body"] == "signed"

    def code_of(call) -> tuple[str, int]:
        with pytest.raises(ClientError) as error:
            call()
        return error.value.response["Error"]["Code"], error.value.response["ResponseMetadata"]["HTTPStatusCode"]

    wrong = signed_client(secured, "AKCHAPP", "not-the-secret", directory)
    assert code_of(lambda: wrong.list_queues()) == ("SignatureDoesNotMatch", 403)
    unknown = signed_client(secured, "AKCHNOBODY", "x", directory)
    assert code_of(lambda: unknown.list_queues()) == ("InvalidClientTokenId", 403)
    assert code_of(lambda: app.create_queue(QueueName="billing"))[0] == "AccessDenied"
    admin = signed_client(secured, "AKCHADMIN", "admin-secret", directory)
    admin.create_queue(QueueName="billing")
    assert code_of(lambda: app.get_queue_url(QueueName="billing")) == ("AccessDenied", 403)


def test_an_unsigned_request_is_refused_when_auth_is_on(secured):
    import requests

    response = requests.post(secured + "/", data={"Action": "ListQueues", "Version": "2012-11-05"}, timeout=10)
    assert response.status_code in (400, 403)
    assert "<ErrorResponse" in response.text
