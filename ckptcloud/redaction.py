"""Secrets out of text: what ckptcloud puts in its own messages, and what the SDKs print at DEBUG.

The cloud SDKs log whole requests when an application turns on DEBUG logging (the usual first step when a save
fails): urllib3 logs each request line, with an Azure SAS signature in its query string, and botocore logs the
signed headers, with the AWS access key id, a session token or an SSE-C key. :func:`install_log_filters` puts a
:class:`RedactingFilter` on exactly those loggers (a logger's filters see only the records logged to it, so each
one is named), and :func:`redact` is what ckptcloud's adapters apply to any SDK text they quote in an error.

What stays visible at DEBUG: request paths (bucket and object names), the SAS fields other than ``sig`` (start,
expiry, permissions), and per-request signatures, which cannot be reused for another request.

Example:
    >>> redact("GET /c/b?sv=2025-01-05&sp=rl&sig=abc%2Bdef%3D HTTP/1.1")
    'GET /c/b?sv=2025-01-05&sp=rl&sig=REDACTED HTTP/1.1'
    >>> redact("Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE0001/20261203/us-east-1/s3/aws4_request")
    'Authorization: AWS4-HMAC-SHA256 Credential=REDACTED/20261203/us-east-1/s3/aws4_request'
"""

from __future__ import annotations

import logging
import re

REDACTED = "REDACTED"

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Azure SAS signature (in URLs, query strings, connection strings); also any `...signature=` query field.
    (re.compile(r"((?:^|[?&;\s'\"])(?:sig|signature|X-Amz-Signature|X-Goog-Signature)=)[^&\s'\";]+", re.I),
     rf"\1{REDACTED}"),
    # Azure account key in a connection string.
    (re.compile(r"(AccountKey=)[^;\s'\"]+", re.I), rf"\1{REDACTED}"),
    # AWS access key id in a SigV4 Authorization header or a presigned URL.
    (re.compile(r"(Credential=|X-Amz-Credential=)[^/\s'\"&]+", re.I), rf"\1{REDACTED}"),
    # Bearer tokens (GCS, Azure AD) and shared-key signatures in Authorization headers.
    (re.compile(r"(Bearer\s+)[^\s'\",]+", re.I), rf"\1{REDACTED}"),
    (re.compile(r"(SharedKey\s+[^:\s'\"]+:)[^\s'\",]+", re.I), rf"\1{REDACTED}"),
    # Header values that are secrets: session tokens and customer-provided encryption keys (S3, GCS, Azure).
    (re.compile(
        r"((?:x-amz-security-token|X-Amz-Security-Token|x-amz-server-side-encryption-customer-key"
        r"|x-amz-copy-source-server-side-encryption-customer-key|x-goog-encryption-key|x-ms-encryption-key)"
        r"['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+", re.I),
     rf"\1{REDACTED}"),
    # The same secrets as request parameters, as botocore logs them ('SSECustomerKey': '...').
    (re.compile(
        r"((?:SSECustomerKey|CopySourceSSECustomerKey|SecretAccessKey|SessionToken|aws_secret_access_key"
        r"|aws_session_token|AccountKey|account_key)['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+", re.I),
     rf"\1{REDACTED}"),
]  # fmt: skip

# The loggers that print requests or headers at DEBUG (records are filtered where they are logged).
SDK_LOGGERS = (
    "urllib3.connectionpool",
    "botocore.endpoint",
    "botocore.auth",
    "botocore.hooks",
    "botocore.parsers",
    "botocore.httpsession",
    "azure.core.pipeline.policies.http_logging_policy",
    "google.auth.transport.requests",
    "google.resumable_media._helpers",
    "ckptcloud",
)


def redact(text: str) -> str:
    """``text`` with SAS signatures, account keys, access key ids, tokens and encryption keys replaced."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message with :func:`redact` (only records that get this far: enabled levels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # a logged traceback: formatted once here, redacted
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = RedactingFilter()


def install_log_filters() -> None:
    """Put the redacting filter on every logger in :data:`SDK_LOGGERS` (idempotent)."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
