"""SQS queue attributes <-> Chute queue settings.

    VisibilityTimeout       -> lease_s (0 is kept as 1 ms: a lease must last a little)
    DelaySeconds            -> delay_s
    MessageRetentionPeriod  -> retention_s (queues made through SQS get AWS's default, 4 days)
    RedrivePolicy           -> dead_letter_queue + max_deliveries
    FifoQueue               -> fifo (at creation only)
    everything else settable (MaximumMessageSize, ReceiveMessageWaitTimeSeconds, RedriveAllowPolicy,
    ContentBasedDeduplication, Policy, KMS settings...) and CreatedTimestamp / LastModifiedTimestamp are kept,
    by their SQS names, in `QueueSettings.attributes`, so they survive restarts.

Invariant: `parse` checks every name and value (ranges and defaults as AWS documents them) before the caller
changes anything; `render` shows any Chute queue, including one made natively, as SQS attributes.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from chute.server.sqs.errors import SqsError

if TYPE_CHECKING:
    from chute.broker import Broker
    from chute.model import QueueSettings

DEFAULT_RETENTION_S = 345_600
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
NO_RETENTION_SHOWN_AS = 1_209_600  # a Chute queue without retention keeps messages forever: shown as the maximum

# name -> (low, high) for integer attributes
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "VisibilityTimeout": (0, 43_200),
    "DelaySeconds": (0, 900),
    "MessageRetentionPeriod": (60, 1_209_600),
    "MaximumMessageSize": (1024, 1_048_576),
    "ReceiveMessageWaitTimeSeconds": (0, 20),
    "KmsDataKeyReusePeriodSeconds": (60, 86_400),
}
BOOLEANS = ("FifoQueue", "ContentBasedDeduplication", "SqsManagedSseEnabled")
CHOICES: dict[str, tuple[str, ...]] = {
    "DeduplicationScope": ("messageGroup", "queue"),
    "FifoThroughputLimit": ("perQueue", "perMessageGroupId"),
}
FIFO_ONLY = ("ContentBasedDeduplication", "DeduplicationScope", "FifoThroughputLimit")
KEPT = (  # settable attributes Chute keeps in QueueSettings.attributes
    "MaximumMessageSize", "ReceiveMessageWaitTimeSeconds", "RedriveAllowPolicy", "ContentBasedDeduplication",
    "DeduplicationScope", "FifoThroughputLimit", "Policy", "KmsMasterKeyId", "KmsDataKeyReusePeriodSeconds",
    "SqsManagedSseEnabled",
)  # fmt: skip
SETTABLE = ("VisibilityTimeout", "DelaySeconds", "MessageRetentionPeriod", "RedrivePolicy", *KEPT)
READ_ONLY = (
    "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed",
    "CreatedTimestamp", "LastModifiedTimestamp", "QueueArn",
)  # fmt: skip
ALL = (*SETTABLE, "FifoQueue", *READ_ONLY)
MAX_POLICY_CHARS = 20 * 1024


def queue_arn(region: str, account_id: str, name: str) -> str:
    return f"arn:aws:sqs:{region}:{account_id}:{name}"


def name_of_arn(arn: object, what: str) -> str:
    """The queue name of an SQS queue ARN (`arn:aws:sqs:<region>:<account>:<name>`)."""
    parts = arn.split(":") if isinstance(arn, str) else []
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs" or not parts[5]:
        raise SqsError("InvalidParameterValue", f"Value {arn} for parameter {what} is invalid. Reason: not an SQS "
                       "queue ARN.")  # fmt: skip
    return parts[5]


def _integer(name: str, value: object) -> int:
    low, high = INTEGER_RANGES[name]
    text = str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else ""
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise SqsError("InvalidAttributeValue", f"Invalid value for the parameter {name}. Reason: must be an "
                       f"integer from {low} to {high}.")  # fmt: skip
    return number


def _boolean(name: str, value: object) -> bool:
    text = str(value).lower() if isinstance(value, str | bool) else ""
    if text not in ("true", "false"):
        raise SqsError("InvalidAttributeValue", f"Invalid value for the parameter {name}. Reason: must be true or "
                       "false.")  # fmt: skip
    return text == "true"


def parse(
    broker: Broker, attributes: object, *, queue_name: str, fifo: bool, creating: bool, region: str, account_id: str,
    found: dict | None = None,
) -> tuple[dict, dict[str, str]]:
    """(changes to QueueSettings fields, attributes to keep) for CreateQueue / SetQueueAttributes `Attributes`."""
    if attributes is None:
        return {}, {}
    if not isinstance(attributes, dict):
        raise SqsError("InvalidParameterValue", "Attributes must be a map of names to strings.")
    changes: dict = {}
    kept: dict[str, str] = {}
    for name, value in attributes.items():
        if name == "FifoQueue" and creating:
            if _boolean(name, value) != fifo:
                raise SqsError("InvalidParameterValue", "The name of a FIFO queue must end with the .fifo suffix, "
                               "and a queue with that suffix must have FifoQueue set to true.")  # fmt: skip
            continue
        if name not in SETTABLE:
            raise SqsError("InvalidAttributeName", f"Unknown Attribute {name}." if name not in ALL
                           else f"Attribute {name} cannot be set.")  # fmt: skip
        if name in FIFO_ONLY and not fifo:
            raise SqsError("InvalidAttributeName", f"Unknown Attribute {name}.")
        if not isinstance(value, str):
            value = str(value)
        if name == "VisibilityTimeout":
            changes["lease_s"] = float(_integer(name, value)) or 0.001
        elif name == "DelaySeconds":
            changes["delay_s"] = float(_integer(name, value))
        elif name == "MessageRetentionPeriod":
            changes["retention_s"] = float(_integer(name, value))
        elif name == "RedrivePolicy":
            changes.update(_redrive_policy(broker, value, queue_name, fifo, region, account_id, found or {}))
        elif name in INTEGER_RANGES:
            kept[name] = str(_integer(name, value))
        elif name in BOOLEANS:
            kept[name] = "true" if _boolean(name, value) else "false"
        elif name in CHOICES:
            if value not in CHOICES[name]:
                raise SqsError("InvalidAttributeValue", f"Invalid value for the parameter {name}. Reason: must be "
                               f"one of {', '.join(CHOICES[name])}.")  # fmt: skip
            kept[name] = value
        elif name == "RedriveAllowPolicy":
            kept[name] = _redrive_allow_policy(value) if value else ""
        else:  # Policy, KmsMasterKeyId: kept as given
            if len(value) > MAX_POLICY_CHARS:
                raise SqsError("InvalidAttributeValue", f"Invalid value for the parameter {name}: too long.")
            kept[name] = value
    return changes, kept


def _redrive_policy(broker: Broker, value: str, queue_name: str, fifo: bool, region: str, account_id: str,
                    found: dict) -> dict:  # fmt: skip
    if value == "":
        return {"dead_letter_queue": None, "max_deliveries": None}
    invalid = f"Value {value} for parameter RedrivePolicy is invalid."
    try:
        policy = json.loads(value)
    except ValueError:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: Invalid JSON.") from None
    if not isinstance(policy, dict) or "deadLetterTargetArn" not in policy or "maxReceiveCount" not in policy:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: Redrive policy does not contain mandatory "
                       "attribute: deadLetterTargetArn and maxReceiveCount.")  # fmt: skip
    unknown = set(policy) - {"deadLetterTargetArn", "maxReceiveCount"}
    if unknown:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: Only following attributes are supported: "
                       "[deadLetterTargetArn, maxReceiveCount].")  # fmt: skip
    count = policy["maxReceiveCount"]
    try:
        count = int(count) if not isinstance(count, bool | float) else None
    except (TypeError, ValueError):
        count = None
    if count is None or not 1 <= count <= 1000:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: Invalid value for maxReceiveCount: {count}, "
                       "valid values are from 1 to 1000 both inclusive.")  # fmt: skip
    dlq_name = name_of_arn(policy["deadLetterTargetArn"], "RedrivePolicy")
    dlq = found.get(dlq_name) or broker.core.queues.get(dlq_name)  # (found: looked up in any shard by the caller)
    if dlq is None or dlq.ephemeral:
        raise SqsError("QueueDoesNotExist", f"{invalid} Reason: Dead letter target does not exist.")
    if dlq_name == queue_name:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: a queue cannot be its own dead-letter queue.")
    if dlq.settings.fifo != fifo:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: Dead-letter target must be of the same type "
                       "(FIFO or standard) as the source.")  # fmt: skip
    allow = (dlq.settings.attributes or {}).get("RedriveAllowPolicy")
    if allow:
        rules = json.loads(allow)
        source_arn = queue_arn(region, account_id, queue_name)
        permission = rules.get("redrivePermission")
        if permission == "denyAll" or (permission == "byQueue" and source_arn not in rules.get("sourceQueueArns", [])):
            raise SqsError("InvalidParameterValue", f"{invalid} Reason: The dead-letter queue's RedriveAllowPolicy "
                           "does not allow this queue as a source.")  # fmt: skip
    return {"dead_letter_queue": dlq_name, "max_deliveries": count}


def _redrive_allow_policy(value: str) -> str:
    invalid = f"Value {value} for parameter RedriveAllowPolicy is invalid."
    try:
        policy = json.loads(value)
    except ValueError:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: Invalid JSON.") from None
    if not isinstance(policy, dict) or set(policy) - {"redrivePermission", "sourceQueueArns"}:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: Only redrivePermission and sourceQueueArns are "
                       "supported.")  # fmt: skip
    permission = policy.get("redrivePermission")
    if permission not in ("allowAll", "denyAll", "byQueue"):
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: redrivePermission must be allowAll, denyAll or "
                       "byQueue.")  # fmt: skip
    arns = policy.get("sourceQueueArns")
    if permission == "byQueue":
        if not isinstance(arns, list) or not 1 <= len(arns) <= 10 or not all(isinstance(a, str) for a in arns):
            raise SqsError("InvalidParameterValue", f"{invalid} Reason: byQueue needs 1 to 10 sourceQueueArns.")
    elif arns is not None:
        raise SqsError("InvalidParameterValue", f"{invalid} Reason: sourceQueueArns is only allowed with byQueue.")
    return json.dumps(policy, separators=(",", ":"))


def render(
    broker: Broker, name: str, settings: QueueSettings, wanted: list[str], *, region: str, account_id: str
) -> dict[str, str]:
    """GetQueueAttributes for `wanted` names (`All` for every one); InvalidAttributeName for an unknown name."""
    for attribute in wanted:
        if attribute != "All" and attribute not in ALL:
            raise SqsError("InvalidAttributeName", f"Unknown Attribute {attribute}.")
    everything = "All" in wanted
    names = ALL if everything else wanted
    kept = settings.attributes or {}
    values: dict[str, str] = {}
    stats = None
    for attribute in names:
        value: str | None
        if attribute == "VisibilityTimeout":
            value = str(math.floor(settings.lease_s))
        elif attribute == "DelaySeconds":
            value = str(math.floor(settings.delay_s))
        elif attribute == "MessageRetentionPeriod":
            value = str(math.floor(settings.retention_s) if settings.retention_s is not None
                        else NO_RETENTION_SHOWN_AS)  # fmt: skip
        elif attribute == "MaximumMessageSize":
            value = kept.get(attribute, str(DEFAULT_MAX_MESSAGE_BYTES))
        elif attribute == "ReceiveMessageWaitTimeSeconds":
            value = kept.get(attribute, "0")
        elif attribute == "RedrivePolicy":
            value = None
            if settings.dead_letter_queue is not None and settings.max_deliveries is not None:
                value = json.dumps({"deadLetterTargetArn": queue_arn(region, account_id, settings.dead_letter_queue),
                                    "maxReceiveCount": settings.max_deliveries}, separators=(",", ":"))  # fmt: skip
        elif attribute == "FifoQueue":
            value = "true" if settings.fifo else None
        elif attribute in FIFO_ONLY:
            default = {"ContentBasedDeduplication": "false", "DeduplicationScope": "queue",
                       "FifoThroughputLimit": "perQueue"}[attribute]  # fmt: skip
            value = kept.get(attribute, default) if settings.fifo else None
        elif attribute == "SqsManagedSseEnabled":
            value = kept.get(attribute, "false")
        elif attribute in ("CreatedTimestamp", "LastModifiedTimestamp"):
            value = kept.get(attribute, kept.get("CreatedTimestamp", "0"))
        elif attribute == "QueueArn":
            value = queue_arn(region, account_id, name)
        elif attribute.startswith("ApproximateNumberOfMessages"):
            stats = stats or broker.queue_stats(name)
            value = str({"ApproximateNumberOfMessages": stats.ready,
                         "ApproximateNumberOfMessagesNotVisible": stats.in_flight,
                         "ApproximateNumberOfMessagesDelayed": stats.delayed}[attribute])  # fmt: skip
        else:  # Policy, KMS, RedriveAllowPolicy: only when set
            value = kept.get(attribute) or None
        if value is not None:
            values[attribute] = value
    return values
