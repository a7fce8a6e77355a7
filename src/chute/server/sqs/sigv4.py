"""AWS Signature Version 4: verify that a request was signed with a given secret key.

    credential = parse_authorization(headers["Authorization"])   # who claims to sign: access key id, date, region
    secret = ...                                                  # look the access key id up (server/auth.py)
    verify(method, raw_path, raw_query, headers, body, secret)    # None, or SqsError

The server recomputes the signature the way the client did (AWS's "Signature Version 4 signing process"):

    canonical request = METHOD \\n canonical URI \\n canonical query \\n canonical headers \\n
                        signed header names \\n hex(sha256(body))
    string to sign    = "AWS4-HMAC-SHA256" \\n timestamp \\n date/region/service/aws4_request \\n
                        hex(sha256(canonical request))
    signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")
    signature         = hex(HMAC(signing key, string to sign))

Only header-signed requests (`Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`)
are accepted; query-string (presigned) and Signature Version 2 requests are not.

Invariants: the signature is compared in constant time; a request whose timestamp is more than 15 minutes from
the server's clock is refused even when its signature is right (as AWS does, so a captured request cannot be
replayed later); the body is hashed only as sent (an `X-Amz-Content-SHA256` header that does not match the body
is a mismatch). Errors are `SqsError`s with AWS's codes: `IncompleteSignature` (400) for a malformed
Authorization header, `SignatureDoesNotMatch` (403) for a wrong signature or a stale timestamp.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote

from chute.server.sqs.errors import SqsError

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 15 * 60
"""AWS refuses a request signed more than 15 minutes before or after its own clock."""
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Credential:
    """What the Authorization header claims: the signer's access key id and the signature's scope."""

    access_key_id: str
    date: str
    """The scope's date, `YYYYMMDD`."""
    region: str
    service: str
    signed_headers: tuple[str, ...]
    """Lower-case header names, in the order the client listed them (sorted, by the specification)."""
    signature: str


def parse_authorization(value: str | None) -> Credential:
    """The credential of a SigV4 `Authorization` header value; IncompleteSignature if it is not one."""
    if not value:
        raise SqsError("IncompleteSignature", "The request is not signed (no Authorization header).")
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise SqsError("IncompleteSignature", f"Unsupported signature algorithm {algorithm!r}: use {ALGORITHM}.")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field_value = part.strip().partition("=")
        if sep:
            fields[name] = field_value.strip()
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if not fields.get(name)]
    if missing:
        raise SqsError("IncompleteSignature", f"Authorization header requires {', '.join(missing)}.")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not scope[0] or len(scope[1]) != 8:
        raise SqsError(
            "IncompleteSignature",
            "Credential must have the form <access key>/<YYYYMMDD>/<region>/<service>/aws4_request.",
        )
    signed = tuple(fields["SignedHeaders"].lower().split(";"))
    return Credential(scope[0], scope[1], scope[2], scope[3], signed, fields["Signature"].lower())


def access_key_id(headers: Mapping[str, str]) -> str | None:
    """The access key id a request claims to be signed by, or None when it carries no SigV4 Authorization."""
    value = _header(headers, "authorization")
    if not value or not value.startswith(ALGORITHM):
        return None
    try:
        return parse_authorization(value).access_key_id
    except SqsError:
        return None


def verify(
    method: str,
    path: str,
    query: str | Iterable[tuple[str, str]] | None,
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
    *,
    now: float | None = None,
    max_skew_s: float = MAX_SKEW_S,
) -> Credential:
    """Check the request's SigV4 signature against `secret`; return its credential, or raise SqsError.

    `path` is the path as sent on the wire (still percent-encoded; a `?query` suffix is split off when `query`
    is None); `query` is the raw query string or its decoded (name, value) pairs; `headers` any mapping with
    case-insensitive or lower-case names (an aiohttp request's headers); `now` the server's clock (epoch s).
    """
    credential = parse_authorization(_header(headers, "authorization"))
    timestamp = _timestamp(headers)
    if credential.date != timestamp[:8]:
        raise SqsError("SignatureDoesNotMatch", "Date in Credential scope does not match the request's date.")
    _check_skew(timestamp, time.time() if now is None else now, max_skew_s)
    if query is None:
        path, _, query = path.partition("?")
    canonical = _canonical_request(method, path, query, headers, body, credential.signed_headers)
    scope = f"{credential.date}/{credential.region}/{credential.service}/aws4_request"
    string_to_sign = "\n".join([ALGORITHM, timestamp, scope, _sha256_hex(canonical.encode())])
    key = signing_key(secret, credential.date, credential.region, credential.service)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, credential.signature):
        raise SqsError(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )
    return credential


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The key derived from the secret for one day, region and service."""
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _canonical_request(method, path, query, headers, body, signed_headers) -> str:
    names = sorted(set(signed_headers))
    if "host" not in names:
        raise SqsError("IncompleteSignature", "The host header must be signed.")
    header_lines = []
    for name in names:
        values = _header_values(headers, name)
        if not values:
            raise SqsError("SignatureDoesNotMatch", f"The signed header {name!r} is missing from the request.")
        header_lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "\n".join([
        method.upper(),
        _canonical_uri(path),
        _canonical_query(query),
        "".join(header_lines),
        ";".join(names),
        _payload_hash(headers, body),
    ])  # fmt: skip


def _canonical_uri(path: str) -> str:
    """The path with dot segments removed, percent-encoded once more (non-S3 services encode it twice)."""
    segments: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    normalized = "/" + "/".join(segments)
    if path.endswith("/") and normalized != "/":
        normalized += "/"
    return quote(normalized, safe="/~")


def _canonical_query(query: str | Iterable[tuple[str, str]]) -> str:
    if isinstance(query, str):
        pairs = []
        for item in query.split("&") if query else ():
            name, _, value = item.partition("=")
            pairs.append((unquote(name), unquote(value)))
    else:
        pairs = list(query)
    encoded = sorted((quote(name, safe="-_.~"), quote(str(value), safe="-_.~")) for name, value in pairs)
    return "&".join(f"{name}={value}" for name, value in encoded)


def _payload_hash(headers: Mapping[str, str], body: bytes) -> str:
    actual = _sha256_hex(body)
    claimed = _header(headers, "x-amz-content-sha256")
    if claimed is None:
        return actual
    if claimed != UNSIGNED_PAYLOAD and claimed.lower() != actual:
        raise SqsError("SignatureDoesNotMatch", "The body does not match its X-Amz-Content-SHA256 header.")
    return claimed


def _timestamp(headers: Mapping[str, str]) -> str:
    """The request's signing time as `YYYYMMDDTHHMMSSZ`, from X-Amz-Date or else the Date header."""
    amz_date = _header(headers, "x-amz-date")
    try:
        if amz_date is not None:
            return datetime.strptime(amz_date, AMZ_DATE_FORMAT).strftime(AMZ_DATE_FORMAT)
        date = _header(headers, "date")
        if date is not None:
            return parsedate_to_datetime(date).astimezone(UTC).strftime(AMZ_DATE_FORMAT)
    except (ValueError, TypeError):
        raise SqsError("IncompleteSignature", "The X-Amz-Date or Date header is not a valid date.") from None
    raise SqsError("IncompleteSignature", "A signed request needs an X-Amz-Date or a Date header.")


def _check_skew(timestamp: str, now: float, max_skew_s: float) -> None:
    signed_at = datetime.strptime(timestamp, AMZ_DATE_FORMAT).replace(tzinfo=UTC).timestamp()
    minutes = int(max_skew_s // 60)

    def fmt(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime(AMZ_DATE_FORMAT)

    if signed_at < now - max_skew_s:
        message = f"Signature expired: {timestamp} is now earlier than {fmt(now - max_skew_s)} ({fmt(now)} - "
        raise SqsError("SignatureDoesNotMatch", message + f"{minutes} min.)")
    if signed_at > now + max_skew_s:
        message = f"Signature not yet current: {timestamp} is still later than {fmt(now + max_skew_s)} ({fmt(now)} + "
        raise SqsError("SignatureDoesNotMatch", message + f"{minutes} min.)")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    values = _header_values(headers, name)
    return values[0] if values else None


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of header `name` (case-insensitive), for multi-dicts and plain dicts alike."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, ()))
    return [value for key, value in headers.items() if key.lower() == name]


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
