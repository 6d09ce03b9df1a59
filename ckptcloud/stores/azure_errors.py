"""Azure SDK errors turned into ckptcloud's errors, with every secret left out of the whole exception chain.

The SDK's exceptions carry the request URL (with a SAS query string, ``sig=`` included) in their text, in their
``inner_exception`` and in their ``response``. So ckptcloud never chains them: the error it raises has, as its
``__cause__``, a :class:`RedactedAzureError` that keeps only the SDK's exception type, HTTP status, error code and
first line of text with signatures and keys replaced by ``REDACTED``; its ``__context__`` is empty.

Each store request is one :class:`Operation`: what it is doing (for messages), whether it is a metadata request
(short read timeout) and which SAS permission it needs, so that a denied request says which letter is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ckptcloud.errors import ObjectChangedError, TransientError
from ckptcloud.redaction import REDACTED
from ckptcloud.redaction import redact as redact_patterns

_CONDITION_FAILED = ("ConditionNotMet", "BlobAlreadyExists")  # what a failed conditional request answers
# Beyond ckptcloud.redaction's patterns: a signature quoted after "(" and the MAC that Azure's 403 text quotes.
_PATTERNS = [
    (re.compile(r"(\((?:sig|signature)=)[^&\s'\"();]+", re.I), rf"\1{REDACTED}"),
    (re.compile(r"(MAC signature found in the HTTP request )'[^']*'", re.I), rf"\1'{REDACTED}'"),
]


@dataclass(frozen=True)
class Operation:
    """One kind of store request.

    ``verb`` is what it does (``{detail}``: e.g. the block number), ``of`` whether the URL follows as "of URL";
    ``metadata`` requests get the short read timeout; ``letter``/``permission``/``purpose`` name the SAS
    permission it needs (each checked on Azurite by taking it away).
    """

    verb: str
    of: bool
    metadata: bool
    letter: str
    permission: str
    purpose: str

    def what(self, detail: str = "") -> str:
        """E.g. ``"staging block 3"``."""
        return self.verb.format(detail=detail)

    def doing(self, target: str, detail: str = "") -> str:
        """E.g. ``"deleting az://c/run/model_1.pt"``, ``"reading the metadata of az://c/run/model_1.pt"``."""
        return f"{self.what(detail)}{' of' if self.of else ''} {target}"


CHECK = Operation("checking the container", False, True, "l", "list", "the container check at construction")
LIST = Operation("listing", False, True, "l", "list", "listing checkpoints (resume, require_empty, ls)")
HEAD = Operation("reading the metadata", True, True, "r", "read", "loading, and saving over an existing name")
DELETE = Operation("deleting", False, True, "d", "delete", "retention (removing old checkpoints)")
UPLOAD = Operation("uploading", False, False, "w", "write", "saving")
STAGE = Operation("staging block {detail}", True, False, "w", "write", "saving")
COMMIT = Operation("committing the block list", True, False, "w", "write", "saving")
DOWNLOAD = Operation("downloading", False, False, "r", "read", "loading")


class RedactedAzureError(Exception):
    """What is left of an Azure SDK error once secrets are removed: the cause of the errors ckptcloud raises.

    Attributes:
        sdk_type: the SDK exception's class name, e.g. ``"ServiceRequestError"``.
        status_code: its HTTP status, if a response came.
        error_code: Azure's error code, e.g. ``"AuthorizationPermissionMismatch"``.
    """

    def __init__(
        self, sdk_type: str, message: str, status_code: int | None = None, error_code: str | None = None
    ) -> None:
        super().__init__(f"{sdk_type}: {message}")
        self.sdk_type, self.message, self.status_code, self.error_code = sdk_type, message, status_code, error_code

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None, str | None]]:
        return type(self), (self.sdk_type, self.message, self.status_code, self.error_code)


def secrets_in(client: Any, cpk: Any = None) -> list[str]:
    """The secret strings a client (and an encryption key) could leak: account key, SAS signature, CPK key.

    Each in the forms it can take in text: as is, percent-encoded and percent-decoded.
    """
    found: list[str] = []
    credential = getattr(client, "credential", None)
    named_key = getattr(credential, "named_key", None)
    found += [getattr(credential, "account_key", None), getattr(named_key, "key", None)]  # type: ignore[list-item]
    sas = getattr(credential, "signature", None) or urlsplit(str(getattr(client, "url", "") or "")).query
    found += [value for name, value in parse_qsl(str(sas or "")) if name == "sig"]
    found.append(getattr(cpk, "key_value", None))  # type: ignore[arg-type]
    forms = {form for s in found if isinstance(s, str) and len(s) >= 8 for form in (s, quote(s, safe=""), unquote(s))}
    return sorted(forms, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with SAS signatures, account keys, Authorization values, tokens, CPK keys and ``secrets`` replaced."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return redact_patterns(text)


def endpoint_of(client: Any) -> str:
    """``scheme://host[:port]`` of the client's URL: never its path's SAS query string."""
    parts = urlsplit(str(getattr(client, "url", "") or ""))
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "the Azure endpoint"


def _hint(code: str, op: Operation) -> str:
    """What a denied request most likely lacks, from Azure's error code and the operation."""
    if code == "AuthorizationPermissionMismatch":
        return (
            f" — a SAS needs the '{op.letter}' ({op.permission}) permission for {op.purpose}"
            " (with Azure AD: a Storage Blob Data role that allows it)"
        )
    if code == "AuthorizationFailure" and op is CHECK:
        return (
            " — the credential cannot list this container (a SAS for single blobs cannot): to load with it, pass"
            " check_bucket=False and require_empty=False"
        )
    if code in ("AuthorizationFailure", "AuthenticationFailed"):
        return " — the account key or SAS is wrong, expired, or for another container or blob"
    if code == "AuthorizationResourceTypeMismatch":
        return " — an account SAS needs the resource types container and object (srt=co)"
    return ""


def translate(err: BaseException, op: Operation, *, container: str, target: str, endpoint: str,
              secrets: Iterable[str] = (), detail: str = "") -> BaseException:  # fmt: skip
    """The builtin or ckptcloud error for the SDK error ``err`` of one request, with a redacted cause.

    ``FileNotFoundError`` (no container, no blob), ``PermissionError`` (denied; names the missing SAS permission
    where the error code tells it), ``ObjectChangedError`` (a condition failed), ``TransientError`` (5xx,
    throttling, unreachable endpoint, no answer within the read timeout, a broken response), else ``OSError``.
    The caller raises it outside its ``except`` block, so the SDK error is not its ``__context__`` either.
    """
    from azure.core import exceptions as az

    status = getattr(err, "status_code", None)
    code = getattr(err, "error_code", None)
    code = str(getattr(code, "value", code) or status or "")
    lines = redact(str(getattr(err, "message", None) or err), secrets).strip().splitlines()
    cause = RedactedAzureError(type(err).__name__, (lines or [""])[0][:500], status, code or None)
    doing, what = op.doing(target, detail), op.what(detail)
    failure: BaseException
    if isinstance(err, (az.ServiceRequestTimeoutError, az.ServiceResponseTimeoutError)):
        limit = re.search(r"(?:read|connect) timeout=([\d.]+)", str(err))
        within = f"within {float(limit.group(1)):g} s" if limit else "within the timeout"
        failure = TransientError(f"no answer from {endpoint} {within} ({doing})")
    elif isinstance(err, az.ServiceRequestError):
        failure = TransientError(f"cannot reach {endpoint} ({doing})")
    elif isinstance(err, (az.ServiceResponseError, az.IncompleteReadError)):
        failure = TransientError(f"the connection to {endpoint} broke before the whole answer came ({doing})")
    elif not isinstance(err, az.HttpResponseError):
        failure = OSError(f"Azure request failed ({doing}): {cause}")
    elif code == "ContainerNotFound" or (status == 404 and op in (CHECK, LIST)):
        failure = FileNotFoundError(f"Azure container {container!r} does not exist ({doing})")
    elif status == 404:
        failure = FileNotFoundError(f"no blob at {target} ({what})")
    elif status is None and isinstance(err, az.ClientAuthenticationError):  # the credential got no token
        failure = PermissionError(f"no credential for {target} ({what}): {cause.message}")
    elif status in (401, 403) or isinstance(err, az.ClientAuthenticationError):
        failure = PermissionError(f"access denied to {target} ({what}): {code}{_hint(code, op)}")
    elif code in _CONDITION_FAILED or isinstance(err, az.ResourceModifiedError):  # a conditional request
        failure = ObjectChangedError(f"{target} is not the version expected ({what}): its ETag changed")
    elif status is not None and (status >= 500 or status == 429):
        failure = TransientError(f"Azure answered {code} for {target} ({what})")
    else:
        failure = OSError(f"Azure answered {code or 'an error'} (HTTP {status}) for {target} ({what})")
    failure.__cause__ = cause
    return failure
