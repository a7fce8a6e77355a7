"""SQS messages in Chute terms: checking bodies and message attributes, their MD5s, message ids, receipt handles,
and the reversible encoding of message attributes as Chute headers.

Message attributes as headers (readable from a native client, reversible):

    attribute "color"  String "red"         -> header "color": "red"
    attribute "n"      Number "42"          -> headers "n": "42",   "sqs:type:n": "Number"
    attribute "blob"   Binary b"\\x00\\x01"   -> headers "blob": "AAE=" (base64), "sqs:type:blob": "Binary"
    custom types ("String.json", "Binary.gz") likewise keep their type in "sqs:type:<name>"
    system attribute AWSTraceHeader "x"     -> header "sqs:AWSTraceHeader": "x"

Header names containing ':' are never valid SQS attribute names, so the `sqs:` headers cannot collide with
attributes. A message published natively shows each of its headers whose name is a valid attribute name as a
String attribute.

Invariants: `md5_of_attributes` is the algorithm AWS documents (names sorted; each of name, data type and value
length-prefixed, 4-byte big-endian; a transport byte 1 for String/Number, 2 for Binary); a receipt handle is
authenticated with a per-server random key, so a forged or garbled one is refused (ReceiptHandleIsInvalid)
before anything is looked up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import re
import struct
import uuid
from decimal import Decimal, InvalidOperation

from chute.server.sqs.errors import SqsError

TYPE_PREFIX = "sqs:type:"
SYSTEM_PREFIX = "sqs:"
MAX_MESSAGE_ATTRIBUTES = 10
MAX_ATTRIBUTE_NAME_CHARS = 256
MAX_DATA_TYPE_CHARS = 256
SYSTEM_ATTRIBUTES = ("AWSTraceHeader",)

# XML 1.0 characters, as SQS allows them in bodies and string values
_INVALID_CHARS = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_DATA_TYPE = re.compile(r"^(String|Number|Binary)(\..+)?$")
_ID_CHARS = re.compile(r"^[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$")


# -- bodies and attributes --------------------------------------------------------------------------------------


def check_body(body: object, field: str = "MessageBody") -> str:
    """The body if it is a non-empty string of allowed characters."""
    if body is None:
        raise SqsError("MissingParameter", f"The request must contain the parameter {field}.")
    if not isinstance(body, str):
        raise SqsError("InvalidParameterValue", f"{field} must be a string.")
    if not body:
        raise SqsError("InvalidParameterValue", f"The request must contain a non-empty {field}.")
    bad = _INVALID_CHARS.search(body)
    if bad is not None:
        raise SqsError(
            "InvalidMessageContents",
            f"Invalid binary character '#x{ord(bad.group()):X}' was found in the message body, the set of allowed "
            "characters is #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF",
        )
    return body


def check_message_attributes(attributes: object, *, system: bool = False) -> tuple[dict[str, dict], int]:
    """Validated attributes (binary values decoded to bytes under "BinaryValue") and their size in bytes (names,
    types and values, as SQS counts them against the message size)."""
    kind = "Message system attribute" if system else "Message (user) attribute"
    if attributes is None:
        return {}, 0
    if not isinstance(attributes, dict):
        raise SqsError("InvalidParameterValue", f"{kind}s must be a map.")
    if not system and len(attributes) > MAX_MESSAGE_ATTRIBUTES:
        raise SqsError(
            "InvalidParameterValue",
            f"Number of message attributes [{len(attributes)}] exceeds the allowed maximum [{MAX_MESSAGE_ATTRIBUTES}].",
        )
    checked: dict[str, dict] = {}
    size = 0
    for name, value in attributes.items():
        if system:
            if name not in SYSTEM_ATTRIBUTES:
                raise SqsError("InvalidParameterValue", f"{kind} name '{name}' is invalid.")
        else:
            _check_attribute_name(name)
        if not isinstance(value, dict):
            raise SqsError("InvalidParameterValue", f"{kind} '{name}' must be a structure.")
        data_type = value.get("DataType")
        if not data_type:
            raise SqsError("InvalidParameterValue", f"The message attribute '{name}' must contain a non-empty "
                           "message attribute type.")  # fmt: skip
        if not isinstance(data_type, str) or len(data_type) > MAX_DATA_TYPE_CHARS or not _DATA_TYPE.match(data_type):
            raise SqsError("InvalidParameterValue", f"The type of message (user) attribute '{name}' is invalid. "
                           "Use only the type prefixes Binary, Number and String.")  # fmt: skip
        if value.get("StringListValues") or value.get("BinaryListValues"):
            raise SqsError("InvalidParameterValue", f"{kind} '{name}': list values are not supported.")
        base = data_type.split(".", 1)[0]
        if base == "Binary":
            raw = value.get("BinaryValue")
            if raw in (None, ""):
                raise SqsError("InvalidParameterValue", f"The message attribute '{name}' with type 'Binary' must "
                               "use field 'Binary'.")  # fmt: skip
            blob = _decode_blob(raw, name)
            if not blob:
                raise SqsError("InvalidParameterValue", f"{kind} '{name}' must contain a non-empty value of type "
                               "'Binary'.")  # fmt: skip
            checked[name] = {"DataType": data_type, "BinaryValue": blob}
            size += len(name.encode()) + len(data_type.encode()) + len(blob)
            continue
        text = value.get("StringValue")
        if text is None or text == "":
            raise SqsError("InvalidParameterValue", f"{kind} '{name}' must contain a non-empty value of type "
                           f"'{base}'.")  # fmt: skip
        if not isinstance(text, str) or _INVALID_CHARS.search(text):
            raise SqsError("InvalidParameterValue", f"{kind} '{name}' contains invalid characters.")
        if base == "Number":
            _check_number(name, text)
        checked[name] = {"DataType": data_type, "StringValue": text}
        size += len(name.encode()) + len(data_type.encode()) + len(text.encode())
    return checked, size


def _well_formed_attribute_name(name: object) -> bool:
    """1-256 characters of A-Z, a-z, 0-9, '_', '-' and '.', with no '.' first, last or twice in a row."""
    return (
        isinstance(name, str)
        and 1 <= len(name) <= MAX_ATTRIBUTE_NAME_CHARS
        and _ATTRIBUTE_NAME.fullmatch(name) is not None
        and not name.startswith(".")
        and not name.endswith(".")
        and ".." not in name
    )


def _reserved_attribute_name(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("aws.") or lowered.startswith("amazon.")


def _check_attribute_name(name: object) -> None:
    if not _well_formed_attribute_name(name):
        raise SqsError("InvalidParameterValue", f"Message (user) attribute name '{name}' is invalid. It must be "
                       "1-256 characters of A-Z, a-z, 0-9, '_', '-' and '.', with no '.' first, last or twice in a "
                       "row.")  # fmt: skip
    if _reserved_attribute_name(name):
        raise SqsError("InvalidParameterValue", f"Message (user) attribute name '{name}' is reserved: names "
                       "starting with 'AWS.' or 'Amazon.' are for AWS.")  # fmt: skip


def _check_number(name: str, text: str) -> None:
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        number = None
    if (
        number is None
        or not number.is_finite()
        or len(number.as_tuple().digits) > 38
        or not (-(Decimal(10) ** 128) <= number <= Decimal(10) ** 126)
    ):
        raise SqsError("InvalidParameterValue", f"Could not cast message attribute '{name}' value to number.")


def _decode_blob(raw: object, name: str) -> bytes:
    if isinstance(raw, bytes | bytearray):
        return bytes(raw)
    if not isinstance(raw, str):
        raise SqsError("InvalidParameterValue", f"The binary value of message attribute '{name}' is invalid.")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SqsError("InvalidParameterValue", f"The binary value of message attribute '{name}' is not valid "
                       "base64.") from None  # fmt: skip


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_of_attributes(attributes: dict[str, dict]) -> str:
    """MD5 of message attributes as AWS documents it; values as checked (binary ones as bytes)."""
    digest = hashlib.md5(usedforsecurity=False)
    for name in sorted(attributes):
        value = attributes[name]
        data_type = value["DataType"]
        for part in (name.encode(), data_type.encode()):
            digest.update(struct.pack(">I", len(part)) + part)
        if "BinaryValue" in value:
            blob = value["BinaryValue"]
            blob = blob if isinstance(blob, bytes) else base64.b64decode(blob)
            digest.update(b"\x02" + struct.pack(">I", len(blob)) + blob)
        else:
            text = value["StringValue"].encode()
            digest.update(b"\x01" + struct.pack(">I", len(text)) + text)
    return digest.hexdigest()


# -- attributes <-> headers -------------------------------------------------------------------------------------


def to_headers(attributes: dict[str, dict], system: dict[str, dict]) -> dict[str, str] | None:
    """Chute headers for checked message attributes and system attributes (see the module docstring)."""
    headers: dict[str, str] = {}
    for name, value in attributes.items():
        data_type = value["DataType"]
        if "BinaryValue" in value:
            headers[name] = base64.b64encode(value["BinaryValue"]).decode()
        else:
            headers[name] = value["StringValue"]
        if data_type != "String":
            headers[TYPE_PREFIX + name] = data_type
    for name, value in system.items():
        headers[SYSTEM_PREFIX + name] = value["StringValue"]
    return headers or None


def from_headers(headers: dict[str, str]) -> tuple[dict[str, dict], dict[str, str]]:
    """(message attributes in the JSON protocol's shape, system attributes by name) for a message's headers."""
    attributes: dict[str, dict] = {}
    system: dict[str, str] = {}
    for name, value in headers.items():
        if name.startswith(SYSTEM_PREFIX):
            if not name.startswith(TYPE_PREFIX) and name[len(SYSTEM_PREFIX) :] in SYSTEM_ATTRIBUTES:
                system[name[len(SYSTEM_PREFIX) :]] = value
            continue
        if not value or not _well_formed_attribute_name(name) or _reserved_attribute_name(name):
            continue  # (a header SendMessage would refuse as an attribute name is not shown as one)
        data_type = headers.get(TYPE_PREFIX + name, "String")
        if data_type.startswith("Binary"):
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                data_type = "String"  # a native header that only claims to be binary: show it as it is
            else:
                attributes[name] = {"DataType": data_type, "BinaryValue": value}
                continue
        attributes[name] = {"DataType": data_type if _DATA_TYPE.match(data_type) else "String", "StringValue": value}
    return attributes, system


def select_attributes(attributes: dict[str, dict], wanted: list[str] | None) -> dict[str, dict]:
    """The attributes ReceiveMessage returns for `MessageAttributeNames`: names, `All`, `.*` or `prefix.*`."""
    if not wanted or not attributes:
        return {}
    if "All" in wanted or ".*" in wanted:
        return attributes
    names = {w for w in wanted if not w.endswith(".*")}
    prefixes = tuple(w[:-1] for w in wanted if w.endswith(".*"))
    return {n: v for n, v in attributes.items() if n in names or (prefixes and n.startswith(prefixes))}


# -- ids and receipt handles ------------------------------------------------------------------------------------


def message_id(chute_id: int) -> str:
    """An SQS MessageId (UUID-shaped) for a Chute message id; `chute_id_of` reverses it. (Formatted by hand: the
    same text as `str(uuid.UUID(int=...))`, at a fraction of the cost, once per message sent and received.)"""
    h = f"{chute_id & _UUID_MASK:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_UUID_MASK = 2**128 - 1
_REQUEST_ID_PREFIX = str(uuid.uuid4())[:24]  # random per process; the counter makes each id unique within it
_request_ids = itertools.count()


def request_id() -> str:
    """A UUID-shaped `x-amzn-RequestId`, unique per server process (random prefix + counter), cheap per request."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_ids) & 0xFFFFFFFFFFFF:012x}"


def chute_id_of(sqs_message_id: str) -> int | None:
    try:
        return uuid.UUID(sqs_message_id).int
    except (ValueError, TypeError, AttributeError):
        return None


def sequence_number(chute_id: int) -> str:
    """FIFO SequenceNumber: Chute ids grow in publish order; 20 digits like SQS's."""
    return f"{chute_id:020d}"


_MAC_BYTES = 16


def _mac(key: bytes, payload: bytes) -> bytes:
    """Keyed BLAKE2b, a MAC by design (one pass, unlike HMAC's two): receipt handles are made and checked once per
    message received and deleted."""
    return hashlib.blake2b(payload, key=key, digest_size=_MAC_BYTES).digest()


# A handle starts with this letter: base64url alone starts with `-` one time in 64, which the AWS CLI reads as an
# option (`--receipt-handle -xyz`: "expected one argument"), so such a message could not be deleted with it.
_HANDLE_TAG = "C"


def make_receipt_handle(key: bytes, queue: str, receipt: int, chute_id: int) -> str:
    payload = f"{queue}\n{receipt}\n{chute_id}".encode()
    mac = _mac(key, payload)
    return _HANDLE_TAG + base64.urlsafe_b64encode(mac + payload).decode()


def parse_receipt_handle(key: bytes, handle: object) -> tuple[str, int, int]:
    """(queue, Chute receipt, Chute message id) of a handle this server issued; ReceiptHandleIsInvalid if not."""
    if not isinstance(handle, str) or not handle or len(handle) > 1024:
        raise SqsError("ReceiptHandleIsInvalid", f'The input receipt handle "{handle}" is not a valid receipt handle.')
    # (a handle issued before handles had their tag, which may start with one too, is read whole)
    forms = (handle[len(_HANDLE_TAG):], handle) if handle.startswith(_HANDLE_TAG) else (handle,)
    for form in forms:
        try:
            raw = base64.urlsafe_b64decode(form.encode())
            mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
            if not hmac.compare_digest(mac, _mac(key, payload)):
                raise ValueError("bad mac")
            queue, receipt, chute_id = payload.decode().split("\n")
            return queue, int(receipt), int(chute_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
    raise SqsError("ReceiptHandleIsInvalid", f'The input receipt handle "{handle}" is not a valid receipt handle.')
