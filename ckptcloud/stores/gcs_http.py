"""HTTP plumbing of the GCS adapter: one JSON-API request, bounded in time, its failure as a builtin exception.

Every request goes through the ``google.cloud.storage.Client``'s authorized ``requests`` session (so credentials,
their refresh and mTLS stay the SDK's), with no retry of its own: the pipeline retries. What a failure says:

- it names what was being done and the ``gs://`` URL, and for a network failure the endpoint
  (``no answer from http://127.0.0.1:4443 within 20 s (checking the bucket gs://b)``);
- a 403 names the IAM permission the request needs;
- never a credential: GCS's own message is included with the bearer token and the encryption key replaced by
  ``REDACTED`` (a proxy may echo request headers), and a resumable session's URL, which lets anyone who holds it
  upload to the object, is never shown nor chained.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ckptcloud.contract import ObjectInfo
from ckptcloud.errors import ObjectChangedError, TransientError

REDACTED = "REDACTED"
_BEARER = re.compile(r"(Bearer\s+)[^\s'\",]+", re.I)
_UPLOAD_ID = re.compile(r"(upload_id=)[^&\s'\"]+", re.I)
_KEY_HEADER = re.compile(r"(x-goog-(?:copy-source-)?encryption-key['\"]?\s*[:=]\s*['\"]?)[A-Za-z0-9+/=_-]+", re.I)


@dataclass(frozen=True)
class Operation:
    """One kind of request: what it does (``{target}`` is the ``gs://`` URL), whether it only moves metadata (the
    short read timeout) and the IAM permissions it needs (named when access is denied)."""

    phrase: str
    metadata: bool
    permissions: str

    def doing(self, target: str, detail: str = "") -> str:
        """E.g. ``"uploading part 3 of gs://b/run/model.pt"``."""
        return self.phrase.format(target=target, detail=detail)


CHECK = Operation("checking the bucket {target}", True, "storage.objects.list")
LIST = Operation("listing {target}", True, "storage.objects.list")
HEAD = Operation("reading the metadata of {target}", True, "storage.objects.get")
DELETE = Operation("deleting {target}", True, "storage.objects.delete")
DOWNLOAD = Operation("downloading {target}", False, "storage.objects.get")
PUT = Operation("uploading {target}", False, "storage.objects.create (and storage.objects.delete to replace)")
PART = Operation("uploading part {detail} of {target}", False, "storage.objects.create")
COMPOSE = Operation(
    "composing {detail} parts into {target}",
    False,
    "storage.objects.create and storage.objects.get (and storage.objects.delete to replace)",
)
START = Operation("starting a resumable upload to {target}", True, "storage.objects.create")
CHUNK = Operation("sending part {detail} of {target} to its resumable upload", False, "storage.objects.create")
STATUS = Operation("asking how much of {target} its resumable upload holds", True, "storage.objects.create")
FINISH = Operation("finishing the resumable upload of {target}", False, PUT.permissions)
CANCEL = Operation("cancelling the resumable upload of {target}", True, "none (the session's URL authorizes it)")


def encryption_headers(key: bytes | None) -> dict[str, str]:
    """The customer-supplied encryption key (CSEK) headers GCS takes on uploads, compose, reads and metadata reads."""
    if key is None:
        return {}
    return {
        "x-goog-encryption-algorithm": "AES256",
        "x-goog-encryption-key": base64.b64encode(key).decode(),
        "x-goog-encryption-key-sha256": base64.b64encode(hashlib.sha256(key).digest()).decode(),
    }


def endpoint_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, without user info, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (an emulator): a key sent over http then never leaves it."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Failure(Exception):
    """A request's failure before it is raised as a builtin: the exception, and whether to chain the cause."""

    def __init__(self, error: BaseException, cause: BaseException | None = None) -> None:
        super().__init__(str(error))
        self.error, self.cause = error, cause


class Transport:
    """Sends requests on ``client._http`` to ``client``'s JSON-API endpoint; ``secrets()`` lists what is redacted."""

    def __init__(self, client: Any, secrets: Callable[[], Iterable[str]]) -> None:
        self.client = client
        self._secrets = secrets

    @property
    def base(self) -> str:
        """The API base URL, e.g. ``https://storage.googleapis.com`` (``STORAGE_EMULATOR_HOST`` points it elsewhere)."""
        return str(self.client._connection.get_api_base_url_for_mtls())

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.base)

    def redact(self, text: str) -> str:
        """``text`` without the bearer token, the encryption key or a resumable session's id."""
        token = getattr(getattr(self.client, "_credentials", None), "token", None)
        for secret in [*self._secrets(), token if isinstance(token, str) else ""]:
            if secret and len(secret) >= 8:
                text = text.replace(secret, REDACTED)
        for pattern in (_BEARER, _UPLOAD_ID, _KEY_HEADER):
            text = pattern.sub(rf"\1{REDACTED}", text)
        return text

    def send(
        self,
        method: str,
        url: str,
        *,
        doing: str,
        timeout: tuple[float, float],
        secret_url: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One request; network failures raise :class:`TransientError` naming the endpoint. HTTP errors are left to
        the caller (:func:`http_error`). ``secret_url``: the URL authorizes uploads, so no exception is chained."""
        import requests

        full = url if url.startswith(("http://", "https://")) else self.base + url
        try:
            return self.client._http.request(method, full, timeout=timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            failure = Failure(self.network_error(err, doing, timeout), None if secret_url else err)
        raise failure.error from failure.cause  # outside the except block: no implicit context either

    def network_error(self, err: BaseException, doing: str, timeout: tuple[float, float]) -> TransientError:
        """A connection failure or timeout as a :class:`TransientError` that names the endpoint and the cause."""
        import requests
        from urllib3.exceptions import ReadTimeoutError

        where = self.endpoint
        if isinstance(err, requests.exceptions.ConnectTimeout):
            return TransientError(f"cannot connect to {where} within {timeout[0]:g} s ({doing})")
        if isinstance(err, requests.exceptions.ReadTimeout) or _caused_by(err, ReadTimeoutError):
            return TransientError(f"no answer from {where} within {timeout[1]:g} s ({doing})")
        return TransientError(f"cannot reach {where} ({doing}): {_reason(err)}")

    def message(self, response: Any) -> str:
        """GCS's error message from a failed response (JSON ``error.message``, else the body's first line)."""
        try:
            text = str(response.json()["error"]["message"])
        except Exception:
            try:
                text = (response.text or "").strip().splitlines()[0] if response.text else ""
            except Exception:
                text = ""
        return self.redact(text)[:300]  # redacted first: a cut must not leave part of a secret


def object_info(item: Mapping[str, Any], version: bool = False) -> ObjectInfo:
    """An object resource (JSON API) as :class:`ObjectInfo`; ``version``: with its generation."""
    from google.api_core.datetime_helpers import from_rfc3339

    generation = str(item["generation"]) if version and item.get("generation") is not None else None
    updated = from_rfc3339(item["updated"]).timestamp() if item.get("updated") else None
    return ObjectInfo(item["name"], int(item.get("size", 0)), updated, dict(item.get("metadata") or {}), generation)


def no_bucket(bucket: str, doing: str) -> FileNotFoundError:
    return FileNotFoundError(f"GCS bucket {bucket!r} does not exist ({doing})")


def bucket_missing(message: str) -> bool:
    """GCS says the bucket is missing (``The specified bucket does not exist.``), not an object."""
    return "bucket does not exist" in message.lower()


def http_error(
    status: int, message: str, op: Operation, doing: str, target: str, missing: Callable[[str], BaseException]
) -> BaseException:
    """The builtin exception for an HTTP error answer; ``missing(message)`` makes the one for a 404 (or 410)."""
    detail = f": {status} {message}" if message else f": {status}"
    if status in (404, 410):
        error = missing(message)
    elif status == 412:
        error = ObjectChangedError(f"{target} is not the generation expected ({doing})")
    elif status in (401, 403):
        error = PermissionError(f"access denied to {target} ({doing}){detail}; this needs {op.permissions}")
    elif status in (408, 429) or status >= 500:
        error = TransientError(f"GCS answered {status} for {target} ({doing}){detail}")
    else:
        hint = ""
        if "encrypt" in message.lower():
            hint = "; pass the key the object was written with: GCSSaver(..., encryption_key=<32 bytes>)"
        error = ValueError(f"GCS refused {doing}{detail}{hint}")
    error.gcs_status = status  # type: ignore[attr-defined]
    return error


def _caused_by(err: BaseException, kind: type) -> bool:
    """Whether ``kind`` is in ``err``'s chain (its args, ``reason``, causes and contexts)."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, kind):
            return True
        todo.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return False


def _reason(err: BaseException) -> str:
    """A short cause without the URL: ``connection refused``, ``connection reset``, ``TLS failure``..."""
    for kind, text in (
        (ConnectionRefusedError, "connection refused"),
        (ConnectionResetError, "connection reset"),
        (ConnectionAbortedError, "connection aborted"),
        (ssl.SSLError, "TLS failure"),
        (TimeoutError, "timed out"),
    ):
        if _caused_by(err, kind):
            return text
    import socket

    if _caused_by(err, socket.gaierror):
        return "host name not resolved"
    return f"connection failed ({type(err).__name__})"
