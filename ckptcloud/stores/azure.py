"""Azure Blob Storage (and Azurite) over block blobs: blocks staged concurrently, one Put Block List publishes.

``commit_block_list`` carries the metadata and makes the blob appear whole, atomically; a failed save never
touches a blob already committed under the same name. Azure cannot delete uncommitted blocks, so ``abort`` sends
nothing: abandoned blocks are never visible (not listed, not readable), are dropped by the next commit or put of
the same name, and are garbage-collected by Azure after 7 days. Block ids are ``f"{upload_id}-{n:06d}"`` (the SDK
base64-encodes them) with a random ``upload_id`` per upload: equal length, as Azure requires, never mixed across
uploads.

Least privilege: every request works with a container SAS (the container check is a one-item listing, which a
SAS with ``l`` allows; Get Container Properties is allowed to no container SAS), and a load works with a read SAS
for one blob when the saver skips the container check. Errors never chain the SDK's exception (its text carries
the SAS): see :mod:`ckptcloud.stores.azure_errors`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from ckptcloud.stores import azure_errors as ops
from ckptcloud.stores.azure_client import make_container_client
from ckptcloud.stores.base import MiB, ObjectInfo, Precondition, Store, StoreLimits

__all__ = ["AzureBlobStore", "make_container_client"]

# Each downloaded chunk is one ranged GET that the SDK buffers whole: 4 MiB (the SDK's own chunk size) bounds a
# load to max_concurrency * 4 MiB in flight while keeping per-request latency a small share of the transfer.
READ_CHUNK_SIZE = 4 * MiB
MAX_BLOCK_SIZE = 4000 * MiB
# Seconds. Metadata requests (the container check, HEAD, listing, delete) answer at once on a healthy service:
# their short read timeout bounds a hung endpoint (accepts TCP, never answers) to about 6 x 20 s under the default
# Retry. Blocks and downloads keep 120 s per read (the clients ckptcloud builds; a client you pass keeps its own).
CONNECT_TIMEOUT = 10
METADATA_READ_TIMEOUT = 20
DATA_READ_TIMEOUT = 120

T = TypeVar("T")


def _conditions(when: Precondition | None) -> dict[str, Any]:
    """Azure's conditional-write headers: ``If-None-Match: *`` (create only) or ``If-Match: <ETag>``."""
    from azure.core import MatchConditions

    if when is None:
        return {}
    if when.version is None:
        return {"if_none_match": "*"}
    return {"etag": when.version, "match_condition": MatchConditions.IfNotModified}


def _encryption_options(encryption_scope: str | None, cpk: Any, endpoint: str) -> tuple[dict, dict]:
    """The SDK keywords for writes (scope or key) and for reads (the key only), after checking the arguments."""
    if encryption_scope is not None and (not isinstance(encryption_scope, str) or not encryption_scope):
        raise ValueError(f"Argument `encryption_scope` should be a non-empty str, but given {encryption_scope!r}")
    if cpk is None:
        return ({"encryption_scope": encryption_scope} if encryption_scope else {}), {}
    if not isinstance(getattr(cpk, "key_value", None), str) or not getattr(cpk, "key_hash", None):
        raise TypeError(
            "Argument `cpk` should be an azure.storage.blob.CustomerProvidedEncryptionKey(key_value, key_hash), "
            f"but given {type(cpk).__name__}"
        )
    if encryption_scope:
        raise ValueError("Pass either `encryption_scope` or `cpk`, not both: Azure encrypts a blob with one key")
    if not endpoint.startswith("https://"):
        raise ValueError(
            f"Argument `cpk` needs an https:// endpoint, but the client's is {endpoint}: the Azure SDK never sends "
            "an encryption key over http"
        )
    return {"cpk": cpk}, {"cpk": cpk}


class AzureBlobStore(Store):
    """One Azure container through a ``ContainerClient`` (thread-safe, shared by the block uploads).

    Args:
        client: the ``ContainerClient``.
        encryption_scope: the encryption scope every write names (``x-ms-encryption-scope``); reads need nothing.
        cpk: a ``CustomerProvidedEncryptionKey`` sent with every write and read (HTTPS only: the SDK refuses it
            over http). Listings then carry no metadata, so resume reads it with one HEAD per checkpoint.

    Example:
        >>> from azure.storage.blob import ContainerClient
        >>> AzureBlobStore(ContainerClient("https://acct.blob.core.windows.net", "ckpts")).url("runs/a.pt")
        'az://ckpts/runs/a.pt'
    """

    scheme = "az"
    # Azure takes 1 byte .. 4000 MiB per block, 50,000 blocks. The 1 MiB floor keeps request counts sane (the
    # pipeline raises part_size past 50,000 blocks); blocks over 4 MiB also get Azure's high-throughput path.
    limits = StoreLimits(min_part_size=1 * MiB, max_part_size=MAX_BLOCK_SIZE, max_parts=50_000)

    def __init__(self, client: Any, *, encryption_scope: str | None = None, cpk: Any = None) -> None:
        self.client = client
        self.bucket = str(client.container_name)
        self.endpoint = ops.endpoint_of(client)
        self._secrets = ops.secrets_in(client, cpk)
        self._writes, self._reads = _encryption_options(encryption_scope, cpk, self.endpoint)

    def _call(self, op: ops.Operation, key: str | None, fn: Callable[..., T], detail: str = "") -> T:
        """``fn(**timeout)``, with SDK errors translated (see :func:`ckptcloud.stores.azure_errors.translate`).

        ``timeout`` is the short read timeout of metadata requests, else nothing (the client's own). The error is
        raised outside the ``except`` block: neither its cause nor its context is the SDK's exception.
        """
        from azure.core.exceptions import AzureError

        timeout = {"read_timeout": METADATA_READ_TIMEOUT} if op.metadata else {}
        target = self.url(key) if key is not None else f"az://{self.bucket}"
        try:
            return fn(**timeout)
        except AzureError as err:
            failure = ops.translate(
                err, op, container=self.bucket, target=target, endpoint=self.endpoint, secrets=self._secrets,
                detail=detail,
            )  # fmt: skip
        raise failure

    def check_bucket(self) -> None:
        # A one-item listing: allowed to a container SAS with 'l' (Get Container Properties is allowed to none).
        self._call(ops.CHECK, None, lambda **t: next(iter(self.client.list_blobs(results_per_page=1, **t).by_page())))

    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        # upload_blob needs bytes (it reads a bytearray/memoryview as an iterable of ints): one copy of an object
        # smaller than part_size. max_concurrency=1: the SDK never starts threads of its own.
        options = {"overwrite": True, "metadata": dict(metadata), "max_concurrency": 1, **_conditions(when)}
        self._call(ops.UPLOAD, key, lambda: self.client.upload_blob(key, data.tobytes(), **options, **self._writes))

    def begin(self, key: str, metadata: Mapping[str, str]) -> Any:
        return self.client.get_blob_client(key), uuid.uuid4().hex, dict(metadata)

    def put_part(self, upload: Any, number: int, data: memoryview) -> Any:
        # The memoryview reaches the socket as is (requests -> urllib3 -> sendall): no copy, not even of the short
        # last block. Measured on Azurite, 4 threads staging 16 MiB blocks: peak RSS +1 MiB, tracemalloc peak
        # 0.2 MiB (with bytes(data): +65 MiB); a file-like wrapper copies nothing either but sent 25-40% slower.
        blob, upload_id, _ = upload
        block_id = f"{upload_id}-{number:06d}"
        stage = lambda: blob.stage_block(block_id, data, length=data.nbytes, **self._writes)  # noqa: E731
        self._call(ops.STAGE, blob.blob_name, stage, detail=str(number))
        return block_id

    def complete(self, upload: Any, parts: list[Any], when: Precondition | None = None) -> None:
        blob, _, metadata = upload
        commit = lambda: blob.commit_block_list(parts, metadata=metadata, **_conditions(when), **self._writes)  # noqa: E731
        self._call(ops.COMMIT, blob.blob_name, commit)

    def abort(self, upload: Any) -> None:
        """Nothing to send: Azure cannot delete uncommitted blocks; they stay invisible (see the module docstring)."""

    def head(self, key: str) -> ObjectInfo:
        blob = self.client.get_blob_client(key)
        p = self._call(ops.HEAD, key, lambda **t: blob.get_blob_properties(**t, **self._reads))
        return ObjectInfo(key, int(p.size), p.last_modified.timestamp(), dict(p.metadata or {}), p.etag)

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        # One ranged GET per READ_CHUNK_SIZE, whatever the client's own download settings (a client passed in may
        # fetch 32 MiB at once), each pinned to ``version`` (the ETag from head()), else to the first chunk's ETag.
        from azure.core import MatchConditions

        blob = self.client.get_blob_client(key)
        pin: dict[str, Any] = {"etag": version, "match_condition": MatchConditions.IfNotModified} if version else {}
        if end is None:
            end = int(self._call(ops.HEAD, key, lambda **t: blob.get_blob_properties(**pin, **t, **self._reads)).size)
        for offset in range(start, end, READ_CHUNK_SIZE):
            length = min(READ_CHUNK_SIZE, end - offset)

            def get(offset: int = offset, length: int = length, pin: dict = pin) -> tuple[str, bytes]:
                stream = blob.download_blob(offset, length, max_concurrency=1, **pin, **self._reads)
                return stream.properties.etag, stream.readall()

            etag, chunk = self._call(ops.DOWNLOAD, key, get)
            pin = pin or {"etag": etag, "match_condition": MatchConditions.IfNotModified}
            yield chunk

    def delete(self, key: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        def delete(**timeout: Any) -> None:
            try:
                self.client.delete_blob(key, **timeout)
            except ResourceNotFoundError as err:
                if getattr(err, "error_code", None) == "ContainerNotFound":
                    raise

        self._call(ops.DELETE, key, delete)

    def list(self, prefix: str) -> list[ObjectInfo]:
        def listing(**timeout: Any) -> list[ObjectInfo]:
            blobs = self.client.list_blobs(name_starts_with=prefix or None, include=["metadata"], **timeout)
            return [ObjectInfo(b.name, b.size, b.last_modified.timestamp(), dict(b.metadata or {})) for b in blobs]

        return self._call(ops.LIST, prefix, listing)
