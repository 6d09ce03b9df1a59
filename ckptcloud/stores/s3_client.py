"""The boto3 clients ckptcloud builds for S3: no SDK retries, and a shorter read timeout for metadata requests.

The pipeline's :class:`~ckptcloud.retry.Retry` retries every request (throttling, 5xx, connection failures,
timeouts). botocore's own retries would run inside each of its attempts (standard mode: 4 requests per attempt),
so an endpoint that accepts connections but never answers would block for attempts x 4 x the read timeout. The
clients made here send each request once; the pipeline's attempts, backoff and deadline bound the whole call, and
its retries log a warning each.

Metadata requests (HeadBucket, HeadObject, listings, single deletes, aborts) answer in milliseconds, so they get
:data:`METADATA_READ_TIMEOUT`; data requests (parts, puts, completes, downloads, batch deletes) keep
:data:`DATA_READ_TIMEOUT` (a read timeout is the longest wait for the next byte, not a bound on a transfer). The
timeouts are read when a client is made: set them before making one.
"""

from __future__ import annotations

import weakref
from typing import Any

CONNECT_TIMEOUT = 10.0  # seconds to open a connection
DATA_READ_TIMEOUT = 120.0  # seconds without a byte on parts, puts, completes, downloads and batch deletes
METADATA_READ_TIMEOUT = 20.0  # seconds without a byte on HeadBucket, HeadObject, listings, deletes and aborts
_metadata_clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def metadata_client_for(client: Any) -> Any:
    """The metadata client :func:`make_s3_client` paired with ``client``; ``client`` itself for any other."""
    try:
        return _metadata_clients.get(client, client)
    except TypeError:  # not weak-referenceable (a test double): no pair
        return client


def make_s3_client(
    *, endpoint_url: str | None = None, region_name: str | None = None, max_concurrency: int = 10
) -> Any:
    """A boto3 S3 client from the standard credential chain (env, profile, SSO, instance/role).

    A custom endpoint (argument, or boto3's ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) gets path-style
    addressing, which MinIO, SeaweedFS and most S3-compatible servers need. The client sends each request once
    (the pipeline retries) and waits up to :data:`DATA_READ_TIMEOUT` for each answer. It is paired with a second
    client of the same session and credentials for metadata requests, which waits :data:`METADATA_READ_TIMEOUT`;
    :class:`~ckptcloud.stores.s3.S3Store` finds it with :func:`metadata_client_for`.
    """
    import os

    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:
        raise ImportError("S3Saver needs boto3: pip install ckptcloud[s3]") from err

    custom_endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    s3: dict[str, Any] = {"payload_signing_enabled": False}  # each body carries its CRC32C instead
    if custom_endpoint:
        s3["addressing_style"] = "path"

    def config(read_timeout: float, pool: int) -> Any:
        return Config(
            max_pool_connections=pool,
            retries={"mode": "standard", "total_max_attempts": 1},  # the pipeline's Retry bounds the whole call
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=read_timeout,
            s3=s3,
            request_checksum_calculation="when_required",  # we send CRC32C ourselves; no second checksum per body
            response_checksum_validation="when_required",  # whole checkpoints are verified by their trailer on load
        )

    session = boto3.session.Session()
    where = {"endpoint_url": endpoint_url, "region_name": region_name}
    client = session.client("s3", **where, config=config(DATA_READ_TIMEOUT, max(10, max_concurrency + 2)))
    _metadata_clients[client] = session.client("s3", **where, config=config(METADATA_READ_TIMEOUT, 10))
    return client
