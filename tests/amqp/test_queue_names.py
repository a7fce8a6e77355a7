"""AMQP queue names and Chute queue names: `chute_queue` escapes what a Chute name cannot hold, `amqp_queue`
undoes only what it escaped, so a native queue whose name merely looks escaped keeps its name on AMQP."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chute.amqp.exchanges import NAME_RE, amqp_queue, chute_queue


def test_escaped_names_come_back_and_look_alikes_stay():
    assert chute_queue("celery@host.celery.pidbox") == "celery_x40_host.celery.pidbox"
    assert amqp_queue("celery_x40_host.celery.pidbox") == "celery@host.celery.pidbox"
    assert amqp_queue("a_x41_") == "a_x41_"  # chute_queue never escapes "A"
    assert amqp_queue("a_xc3_") == "a_xc3_"  # not UTF-8: it used to come back as "a\ufffd"
    assert amqp_queue("a_x40__x41_") == "a@_x41_"  # one escape chute_queue wrote, one look-alike
    assert amqp_queue("ab_xc3a9_") == "abé"


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda n: n[0].isalnum()))
def test_every_name_chute_takes_comes_back_as_it_was_declared(name):
    stored = chute_queue(name)
    if NAME_RE.match(stored) and "_x" not in name:  # (a name with "_x" of its own may share its Chute queue)
        assert amqp_queue(stored) == name


def test_a_native_queue_that_looks_escaped_is_declared_under_its_own_name(server, channel):
    """pika's declare of `a_x41_` (a Chute name as it is) got a declare-ok naming `aA`; the reply names the queue
    as the client did."""
    assert channel.queue_declare("look_x41_alike").method.queue == "look_x41_alike"
    assert channel.queue_declare("look_x41_alike", passive=True).method.queue == "look_x41_alike"
    channel.confirm_delivery()
    channel.basic_publish("", "look_x41_alike", b"here")
    method, _, body = channel.basic_get("look_x41_alike", auto_ack=True)
    assert body == b"here" and method.routing_key == "look_x41_alike"
