"""S3 errors as ckptcloud's: SDK failures translated into builtins and ckptcloud errors that name the object.

Transient failures become :class:`~ckptcloud.errors.TransientError`, which the pipeline's ``Retry`` retries; the
clients :func:`~ckptcloud.stores.s3.make_s3_client` builds do not retry on their own, so this table must cover
what botocore's standard retry mode would have retried: throttling codes, request timeouts, 5xx and 429, and
connection failures. Messages name the bucket, key and endpoint, never credentials nor ``extra_args`` values.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ckptcloud.errors import ObjectChangedError, TransientError, UploadGoneError

logger = logging.getLogger("ckptcloud")

MISSING_BUCKET = {"NoSuchBucket"}
MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}  # a failed conditional request
# What botocore's standard mode retries (its throttling and transient codes), plus S3's own. BadDigest: the bytes
# the server got do not match their CRC32C (damaged in transit); they are resent from the pipeline's buffer.
TRANSIENT = {
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "TransactionInProgressException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
    "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "OperationAborted", "BadDigest", "500", "502", "503", "504", "429",
}  # fmt: skip


def error_code(err: Any) -> str:
    """The S3 error code of a botocore ``ClientError`` (``""`` if none)."""
    return str(err.response.get("Error", {}).get("Code", ""))


def multipart_etag(parts: list[dict[str, Any]]) -> str | None:
    """The ETag S3 gives the object completed from ``parts``: the MD5 of the part MD5s, then ``-<count>``.

    ``None`` when a part's ETag is not a hex MD5 (some servers use other ETags): then nothing can be compared.
    """
    try:
        digests = b"".join(bytes.fromhex(str(part["ETag"]).strip('"')) for part in parts)
    except (KeyError, ValueError):
        return None
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


def confirm_completed(
    version: Callable[[], str | None], url: str, parts: list[dict[str, Any]], gone: Exception
) -> None:
    """After ``NoSuchUpload`` from a complete: return if the object at ``url`` is the one ``parts`` make (a retried
    complete whose first answer was lost, on a server that forgets completed uploads), else raise
    :class:`UploadGoneError` from ``gone``. ``version()`` HEADs the object: its ETag, or ``FileNotFoundError``."""
    expected = multipart_etag(parts)
    try:
        found: str | None = version()
        there = "no object is there" if found is None else f"the object there has ETag {found}"
    except FileNotFoundError:
        found, there = None, "no object is there"
    except PermissionError as err:  # (a transient failure propagates: the retried complete checks again)
        found, there = None, f"the object there could not be checked ({err})"
    if expected is not None and found is not None and found.strip('"') == expected.strip('"'):
        logger.info("%s was already completed (NoSuchUpload on a repeat): its ETag is the upload's", url)
        return
    raise UploadGoneError(
        f"the multipart upload to {url} no longer exists (NoSuchUpload) and {there}, not the ETag "
        f"{expected or '(unknown)'} of its parts: the upload was aborted (cleanup_incomplete, a lifecycle rule or "
        "another process) or expired. Nothing was saved; save again."
    ) from gone


@contextlib.contextmanager
def s3_errors(client: Any, bucket: str, target: str, what: str, *, on_key: bool) -> Iterator[None]:
    """Translate the SDK errors raised inside into builtins and ckptcloud errors.

    Args:
        client: the client that sent the request (its endpoint and timeouts are named in messages).
        bucket: the bucket's name.
        target: ``s3://bucket`` or ``s3://bucket/key``.
        what: what the request does, e.g. ``"checking the bucket"``.
        on_key: the request is about an object (a 404 then means no object, not no bucket).
    """
    from botocore import exceptions as boto

    try:
        yield
    except boto.ClientError as err:
        code = error_code(err)
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in MISSING_BUCKET or (code in MISSING_KEY and not on_key):
            raise FileNotFoundError(f"S3 bucket {bucket!r} does not exist ({what})") from err
        if code in MISSING_KEY:
            raise FileNotFoundError(f"no object at {target} ({what})") from err
        if code in DENIED:
            raise PermissionError(f"access denied to {target} ({what}): {code}") from err
        if code in CONDITION_FAILED or status == 412:  # a conditional request: the object is another version
            raise ObjectChangedError(f"{target} is not the version expected ({what}): its ETag changed") from err
        if code in TRANSIENT or status >= 500 or status == 429:
            raise TransientError(f"S3 answered {code or status} for {target} ({what})") from err
        raise
    except boto.ReadTimeoutError as err:
        within = _seconds(client, "read_timeout")
        raise TransientError(f"no answer from {_endpoint(client)} within {within} ({what} {target})") from err
    except boto.ConnectTimeoutError as err:
        within = _seconds(client, "connect_timeout")
        raise TransientError(
            f"cannot reach the S3 endpoint {_endpoint(client)}: no connection within {within} ({what} {target})"
        ) from err
    except (boto.ConnectionError, boto.HTTPClientError, boto.ResponseStreamingError) as err:
        raise TransientError(f"cannot reach the S3 endpoint {_endpoint(client)} ({what} {target}): {err}") from err


def _endpoint(client: Any) -> str:
    """The client's endpoint URL (scheme, host, port; no path, query or credentials)."""
    from urllib.parse import urlsplit

    url = urlsplit(str(getattr(client.meta, "endpoint_url", "") or ""))
    host = url.hostname or "?"
    return f"{url.scheme}://{host}{f':{url.port}' if url.port else ''}"


def _seconds(client: Any, name: str) -> str:
    """``"20 s"``: one of the client's timeouts, for a message."""
    value = getattr(getattr(client.meta, "config", None), name, None)
    return f"{value:g} s" if isinstance(value, (int, float)) else f"its {name.replace('_', ' ')}"


def delete_error(failed: list[tuple[str, str]], total: int) -> OSError:
    """One error for the ``(url, code)`` pairs a ``DeleteObjects`` could not delete, naming up to five."""
    shown = ", ".join(f"{url} ({code})" for url, code in failed[:5])
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    message = f"S3 did not delete {len(failed)} of {total} objects: {shown}{more}"
    codes = {code for _, code in failed}
    if codes & DENIED:
        return PermissionError(f"access denied: {message}")
    if codes <= TRANSIENT:
        return TransientError(message)
    return OSError(message)
