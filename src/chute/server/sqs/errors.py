"""The errors the SQS API answers with, as AWS names them.

One table, `CODES`: the JSON protocol's short code (the `__type` after `com.amazonaws.sqs#`), the legacy query
protocol's code (sent by the JSON protocol too, in the `x-amzn-query-error` header, so legacy botocore error
handling sees it), the HTTP status and whether the sender is at fault. `SqsError(code, message)` fills the rest
from the table; `from_chute(error)` translates a Chute error into the SQS error a client expects.

Invariant: every error an SQS handler lets escape is an `SqsError` (the protocol modules turn anything else into
`InternalError`, status 500); a code in `CODES` keeps its query code and status.
"""

from __future__ import annotations

from chute import errors as chute_errors

# code -> (query code, HTTP status, sender fault)
CODES: dict[str, tuple[str, int, bool]] = {
    "AccessDenied": ("AccessDenied", 403, True),
    "BatchEntryIdsNotDistinct": ("AWS.SimpleQueueService.BatchEntryIdsNotDistinct", 400, True),
    "BatchRequestTooLong": ("AWS.SimpleQueueService.BatchRequestTooLong", 400, True),
    "EmptyBatchRequest": ("AWS.SimpleQueueService.EmptyBatchRequest", 400, True),
    "IncompleteSignature": ("IncompleteSignature", 400, True),
    "InternalError": ("InternalError", 500, False),
    "InvalidAction": ("InvalidAction", 400, True),
    "InvalidAddress": ("InvalidAddress", 404, True),
    "InvalidAttributeName": ("InvalidAttributeName", 400, True),
    "InvalidAttributeValue": ("InvalidAttributeValue", 400, True),
    "InvalidBatchEntryId": ("AWS.SimpleQueueService.InvalidBatchEntryId", 400, True),
    "InvalidClientTokenId": ("InvalidClientTokenId", 403, True),
    "InvalidMessageContents": ("InvalidMessageContents", 400, True),
    "InvalidParameterValue": ("InvalidParameterValue", 400, True),
    "InvalidSecurity": ("InvalidSecurity", 403, True),
    "MessageNotInflight": ("AWS.SimpleQueueService.MessageNotInflight", 400, True),
    "MissingParameter": ("MissingParameter", 400, True),
    "OverLimit": ("OverLimit", 403, True),
    "PurgeQueueInProgress": ("AWS.SimpleQueueService.PurgeQueueInProgress", 403, True),
    "QueueDeletedRecently": ("AWS.SimpleQueueService.QueueDeletedRecently", 400, True),
    "QueueDoesNotExist": ("AWS.SimpleQueueService.NonExistentQueue", 400, True),
    "QueueNameExists": ("QueueAlreadyExists", 400, True),
    "ReceiptHandleIsInvalid": ("ReceiptHandleIsInvalid", 400, True),
    "RequestThrottled": ("RequestThrottled", 403, True),
    "ResourceNotFoundException": ("ResourceNotFoundException", 404, True),
    "ServiceUnavailable": ("ServiceUnavailable", 503, False),
    "SignatureDoesNotMatch": ("SignatureDoesNotMatch", 403, True),
    "TooManyEntriesInBatchRequest": ("AWS.SimpleQueueService.TooManyEntriesInBatchRequest", 400, True),
    "UnsupportedOperation": ("AWS.SimpleQueueService.UnsupportedOperation", 400, True),
}

JSON_TYPE_PREFIX = "com.amazonaws.sqs#"


class SqsError(Exception):
    """An error as SQS reports it. `SqsError("QueueDoesNotExist", "...")`: query code, status and fault come from
    `CODES` (an unknown code is a sender fault with status 400 and itself as query code)."""

    code: str
    query_code: str
    status: int
    sender_fault: bool
    message: str

    def __init__(self, code: str, message: str = "", *, status: int | None = None) -> None:
        query_code, default_status, sender_fault = CODES.get(code, (code, 400, True))
        self.code = code
        self.query_code = query_code
        self.status = status if status is not None else default_status
        self.sender_fault = sender_fault
        self.message = message or code
        super().__init__(self.message)

    @property
    def fault(self) -> str:
        """`Sender` or `Receiver`, as the query protocol's `<Type>` and the query-error header say it."""
        return "Sender" if self.sender_fault else "Receiver"

    def __repr__(self) -> str:
        return f"SqsError({self.code!r}, {self.message!r})"


def from_chute(error: chute_errors.ChuteError) -> SqsError:
    """The SQS error for a Chute error raised by the broker on behalf of an SQS call."""
    code = _FROM_CHUTE.get(type(error))
    if code is None:
        code = "ServiceUnavailable" if error.retryable else "InternalError"
    return SqsError(code, error.message)


_FROM_CHUTE: dict[type[chute_errors.ChuteError], str] = {
    chute_errors.InvalidName: "InvalidParameterValue",
    chute_errors.InvalidArgument: "InvalidParameterValue",
    chute_errors.MessageTooLarge: "InvalidParameterValue",
    chute_errors.InvalidReceipt: "ReceiptHandleIsInvalid",
    chute_errors.QueueNotFound: "QueueDoesNotExist",
    chute_errors.QueueExists: "QueueNameExists",
    chute_errors.TopicExists: "QueueNameExists",  # queues and topics share one namespace
    chute_errors.TopicNotFound: "QueueDoesNotExist",
    chute_errors.QueueInUse: "InvalidParameterValue",
    chute_errors.QueueFull: "OverLimit",
    chute_errors.ServerBusy: "RequestThrottled",  # over the memory high-water mark (see __init__.py)
    chute_errors.Unauthenticated: "InvalidClientTokenId",
    chute_errors.Forbidden: "AccessDenied",
    chute_errors.BrokerClosed: "ServiceUnavailable",
    chute_errors.StorageFailed: "ServiceUnavailable",
    chute_errors.StorageFull: "ServiceUnavailable",
    chute_errors.StorageReadOnly: "ServiceUnavailable",
}
