"""Queue settings `tags` and `attributes` (protocol extras such as SQS attributes): validated and bounded, kept by
create and update, across restarts and checkpoints, on both stores."""

from __future__ import annotations

import pytest

from chute.errors import InvalidArgument
from chute.model import MAX_ATTRIBUTE_VALUE_CHARS, MAX_ATTRIBUTES, MAX_TAGS, QueueSettings


async def test_tags_and_attributes_survive_updates_restarts_and_checkpoints(broker, reopen):
    await broker.create_queue("q", tags={"team": "core"}, attributes={"MaximumMessageSize": "2048"})
    await broker.update_queue("q", tags={"team": "core", "env": "ci"})
    broker = await reopen(broker)
    [info] = broker.list_queues()
    assert info.settings.tags == {"team": "core", "env": "ci"}
    assert info.settings.attributes == {"MaximumMessageSize": "2048"}
    await broker.checkpoint()
    await broker.update_queue("q", attributes=None)
    broker = await reopen(broker)
    [info] = broker.list_queues()
    assert (info.settings.tags, info.settings.attributes) == ({"team": "core", "env": "ci"}, None)
    await broker.close()


@pytest.mark.parametrize(
    "settings",
    [
        {"tags": {f"k{i}": "v" for i in range(MAX_TAGS + 1)}},
        {"tags": {"": "empty key"}},
        {"tags": {"k": "v" * 257}},
        {"tags": {"k" * 129: "v"}},
        {"attributes": {f"a{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}},
        {"attributes": {"a": "v" * (MAX_ATTRIBUTE_VALUE_CHARS + 1)}},
        {"attributes": {"a" * 65: "v"}},
    ],
)
def test_out_of_bounds_extras_are_refused(settings):
    with pytest.raises(InvalidArgument):
        QueueSettings(**settings).validate("q")


async def test_a_refused_update_changes_nothing(broker):
    await broker.create_queue("q", tags={"a": "b"})
    with pytest.raises(InvalidArgument):
        await broker.update_queue("q", tags={f"k{i}": "v" for i in range(MAX_TAGS + 1)})
    assert broker.list_queues()[0].settings.tags == {"a": "b"}
