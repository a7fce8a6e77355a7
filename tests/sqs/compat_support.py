"""Helpers for the SQS compatibility tests: an SQS endpoint to test against, and clients that speak to it.

    with sqs_endpoint() as url: ...          # Chute (a running_server()); CHUTE_SQS_TARGET=moto: moto's server
    client = query_client(url, tmp_path)     # botocore speaking the legacy query protocol (form in, XML out)
    env = aws_cli_env(tmp_path)              # environment for the `aws` command: dummy keys, empty config files

Botocore itself speaks only the JSON protocol to SQS now. `query_client` loads botocore's installed SQS model
re-dressed as the older query-protocol model: the same shapes, with the XML element names (`locationName`) the
query protocol flattens lists and maps under. It is an independent check of the server's query module: the same
client passes against moto's query implementation (CHUTE_SQS_TARGET=moto).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import botocore.session
from botocore.config import Config

from chute.testing import running_server

__all__ = ["aws_cli_env", "query_client", "running_server", "sqs_endpoint"]

TARGET = os.environ.get("CHUTE_SQS_TARGET", "chute")
REGION = "us-east-1"
ACCESS_KEY = "test-key"
SECRET_KEY = "test-secret"


@contextlib.contextmanager
def sqs_endpoint(**server_options) -> Iterator[str]:
    """The URL of an SQS endpoint on 127.0.0.1 for one test (options: ServerConfig fields, Chute only)."""
    if TARGET == "moto":
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
        return
    with running_server(**server_options) as server:
        yield f"http://127.0.0.1:{server.http_port}"


# The query protocol's element names, by shape: a list's member element, and a map's (entry, key, value).
QUERY_LIST_MEMBERS = {
    "AWSAccountIdList": "AWSAccountId",
    "ActionNameList": "ActionName",
    "AttributeNameList": "AttributeName",
    "BatchResultErrorEntryList": "BatchResultErrorEntry",
    "BinaryList": "BinaryListValue",
    "ChangeMessageVisibilityBatchRequestEntryList": "ChangeMessageVisibilityBatchRequestEntry",
    "ChangeMessageVisibilityBatchResultEntryList": "ChangeMessageVisibilityBatchResultEntry",
    "DeleteMessageBatchRequestEntryList": "DeleteMessageBatchRequestEntry",
    "DeleteMessageBatchResultEntryList": "DeleteMessageBatchResultEntry",
    "ListMessageMoveTasksResultEntryList": "ListMessageMoveTasksResultEntry",
    "MessageAttributeNameList": "MessageAttributeName",
    "MessageList": "Message",
    "MessageSystemAttributeList": "MessageSystemAttributeName",
    "QueueUrlList": "QueueUrl",
    "SendMessageBatchRequestEntryList": "SendMessageBatchRequestEntry",
    "SendMessageBatchResultEntryList": "SendMessageBatchResultEntry",
    "StringList": "StringListValue",
    "TagKeyList": "TagKey",
}
QUERY_MAPS = {
    "MessageBodyAttributeMap": ("MessageAttribute", "Name", "Value"),
    "MessageBodySystemAttributeMap": ("MessageSystemAttribute", "Name", "Value"),
    "MessageSystemAttributeMap": ("Attribute", "Name", "Value"),
    "QueueAttributeMap": ("Attribute", "Name", "Value"),
    "TagMap": ("Tag", "Key", "Value"),
}


def query_model() -> dict:
    """Botocore's SQS service model, turned into the query protocol's."""
    loader = botocore.session.get_session().get_component("data_loader")
    model = copy.deepcopy(loader.load_service_model("sqs", "service-2"))
    metadata = model["metadata"]
    metadata.update(protocol="query", protocols=["query"], xmlNamespace="http://queue.amazonaws.com/doc/2012-11-05/")
    for key in ("jsonVersion", "targetPrefix", "awsQueryCompatible"):
        metadata.pop(key, None)
    shapes = model["shapes"]
    for name, element in QUERY_LIST_MEMBERS.items():
        shapes[name]["member"]["locationName"] = element
        shapes[name]["flattened"] = True
    for name, (_, key, value) in QUERY_MAPS.items():
        shapes[name]["key"]["locationName"] = key
        shapes[name]["value"]["locationName"] = value
    for shape in shapes.values():
        for member in shape.get("members", {}).values():
            target = shapes[member["shape"]]
            if member["shape"] in QUERY_MAPS:
                member["locationName"] = QUERY_MAPS[member["shape"]][0]
            elif target["type"] == "list" and member["shape"] in QUERY_LIST_MEMBERS:
                member["flattened"] = True
    for name, operation in model["operations"].items():
        if operation.get("output"):
            operation["output"]["resultWrapper"] = f"{name}Result"
    return model


def query_client(endpoint_url: str, directory: Path, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
    """A botocore SQS client that speaks the query protocol (its model is written under `directory`)."""
    model_dir = directory / "models" / "sqs" / "2012-11-05"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "service-2.json").write_text(json.dumps(query_model()))
    session = botocore.session.get_session()
    session.get_component("data_loader").search_paths.insert(0, str(directory / "models"))
    client = session.create_client(
        "sqs", region_name=REGION, endpoint_url=endpoint_url, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, config=Config(retries={"max_attempts": 1}),
    )  # fmt: skip
    assert client.meta.service_model.protocol == "query"
    return client


def aws_cli_env(directory: Path) -> dict[str, str]:
    """The environment for the `aws` command: dummy credentials and region, empty config files."""
    config = directory / "aws-config"
    credentials = directory / "aws-credentials"
    config.write_text("")
    credentials.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_PAGER": "",
    }
