"""The named savers: ``S3Saver``, ``GCSSaver``, ``AzureBlobSaver``.

Each is :class:`~ckptcloud.remote.RemoteSaver` (the one pipeline) wired to its store adapter: it builds the SDK
client from the standard credential chain (or takes yours) and forwards every pipeline option. No cloud SDK is
imported until a saver is constructed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptcloud.remote import (
    DEFAULT_MAX_CONCURRENCY,
    RemoteSaver,
    check_bucket_name,
    check_concurrency,
    resolve_load_concurrency,
)
from ckptcloud.stores.azure import AzureBlobStore, make_container_client
from ckptcloud.stores.base import MiB
from ckptcloud.stores.gcs import GCSStore
from ckptcloud.stores.s3 import S3Store, make_s3_client

GCS_COMPOSITE_PART_SIZE = 16 * MiB
GCS_COMPOSITE_MAX_CONCURRENCY = 8


class S3Saver(RemoteSaver):
    """Save handler for S3 and S3-compatible servers: streamed multipart uploads with bounded memory.

    Credentials come from boto3's standard chain (environment, ``~/.aws`` profiles, SSO, instance roles) or the
    ``client`` you pass; they never appear in a repr, a log line or an error message.

    Args:
        bucket: an existing bucket.
        prefix: key prefix for every checkpoint.
        client: a ready ``boto3`` S3 client (then ``endpoint_url``/``region_name`` are ignored).
        endpoint_url: for MinIO, SeaweedFS and friends, e.g. ``http://127.0.0.1:9000`` (path-style addressing).
        region_name: AWS region.
        extra_args: extra upload arguments, e.g. ``{"ServerSideEncryption": "aws:kms", "StorageClass": ...}``:
            those both PutObject and CreateMultipartUpload take. Each request gets the ones its operation takes
            (SSE-C keys also go with every part, the complete, HEAD and GET; ``RequestPayer`` and
            ``ExpectedBucketOwner`` with every request). Keys ckptcloud sets itself (``Metadata``, ``Checksum*``,
            ...) raise ``ValueError`` here.
        **options: the pipeline's options, passed to :class:`~ckptcloud.remote.RemoteSaver`: ``part_size``,
            ``max_concurrency`` (peak extra memory is ``(max_concurrency + 1) * part_size``), ``load_concurrency``
            (ranged GETs per load, default ``max(32, max_concurrency)``; no memory per range), ``require_empty``,
            ``save_on_rank``, ``tmp_dir``, ``retry``, ``dedup``, ``dedup_grace`` (content-addressed saves: see
            :mod:`ckptcloud.dedup`); any other keyword goes to ``torch.save``.
            Parts are 5 MiB to 5 GiB (default 8 MiB, 16 at once), raised automatically past 10,000 parts.

    Example:
        >>> saver = S3Saver("my-bucket", "runs/42", endpoint_url="http://127.0.0.1:9000")  # doctest: +SKIP
        >>> saver({"model": model.state_dict()}, "model_1.pt")  # doctest: +SKIP
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        extra_args: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        check_bucket_name(bucket)
        if client is None:
            concurrency = _connections(options)
            client = make_s3_client(endpoint_url=endpoint_url, region_name=region_name, max_concurrency=concurrency)
        super().__init__(S3Store(client, bucket, extra_args=extra_args), prefix, **options)


class GCSSaver(RemoteSaver):
    """Save handler for Google Cloud Storage: streamed uploads with bounded memory, published atomically.

    Credentials come from Application Default Credentials or the ``client`` you pass (``STORAGE_EMULATOR_HOST``
    points the default client at an emulator); they never appear in a repr, a log line or an error message.

    Args:
        bucket: an existing bucket.
        prefix: object-name prefix for every checkpoint.
        client: a ready ``google.cloud.storage.Client`` (then ``project`` is ignored).
        project: project of the default client (bucket operations do not need one).
        upload: ``"composite"`` (default): parts uploaded in parallel as temporary objects under
            ``.ckptcloud-tmp/``, then composed; deleted temporaries are billed again under soft delete (7 days by
            default) and, in Nearline/Coldline/Archive buckets, for their minimum storage duration.
            ``"resumable"``: one resumable upload per object, parts sent in order (one stream, no temporary
            objects); ``max_concurrency`` then defaults to 2. It publishes only if the object is still what it was
            when the upload began, even without a run id (see :mod:`ckptcloud.stores.gcs_resumable`).
        kms_key_name: a Cloud KMS key, ``projects/P/locations/L/keyRings/R/cryptoKeys/K``, for every object
            written (the bucket's service agent needs ``roles/cloudkms.cryptoKeyEncrypterDecrypter`` on it).
        encryption_key: a customer-supplied AES-256 key (32 bytes) for every object written and read; GCS keeps
            only its hash, so a lost key is lost data. Not with ``kms_key_name``.
        **options: the pipeline's options, passed to :class:`~ckptcloud.remote.RemoteSaver`: ``part_size``,
            ``max_concurrency`` (peak extra memory is ``(max_concurrency + 1) * part_size``), ``load_concurrency``
            (ranged GETs per load, default ``max(32, max_concurrency)``; no memory per range), ``require_empty``,
            ``save_on_rank``, ``tmp_dir``, ``retry``, ``dedup``, ``dedup_grace`` (content-addressed saves: see
            :mod:`ckptcloud.dedup`); any other keyword goes to ``torch.save``.
            Parts are 256 KiB to 5 GiB in multiples of 256 KiB, raised past 10,000 parts; composite uploads default
            to 16 MiB parts, 8 at once (fewer compose levels, so fewer soft-deleted bytes), resumable ones to 8 MiB.
            ``load_concurrency`` defaults to ``max_concurrency`` here (the client's session pools 10 connections).

    Example:
        >>> saver = GCSSaver("my-bucket", "runs/42", project="my-project", upload="resumable")  # doctest: +SKIP
        >>> saver({"model": model.state_dict()}, "model_1.pt")  # doctest: +SKIP
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        project: str | None = None,
        upload: str = "composite",
        kms_key_name: str | None = None,
        encryption_key: bytes | None = None,
        **options: Any,
    ) -> None:
        check_bucket_name(bucket)
        if client is None:
            try:
                from google.cloud import storage
            except ImportError as err:
                raise ImportError("GCSSaver needs google-cloud-storage: pip install ckptcloud[gcs]") from err
            client = storage.Client(project=project)
        store = GCSStore(client, bucket, upload=upload, kms_key_name=kms_key_name, encryption_key=encryption_key)
        if upload == "resumable":
            options.setdefault("max_concurrency", 2)  # one part in flight, one waiting: the stream never idles
        else:  # composite: 16 MiB x 8 (the memory of 8 MiB x 16) keeps 32 parts, one compose level, to 512 MiB
            options.setdefault("part_size", GCS_COMPOSITE_PART_SIZE)
            options.setdefault("max_concurrency", GCS_COMPOSITE_MAX_CONCURRENCY)
        # google-cloud-storage's session pools 10 connections per host: more threads would each open a connection
        # and discard it with a warning. Loads keep max_concurrency ranges in flight, as before, unless told.
        options.setdefault("load_concurrency", options["max_concurrency"])
        super().__init__(store, prefix, **options)


class AzureBlobSaver(RemoteSaver):
    """Save handler for Azure Blob Storage: blocks staged concurrently with bounded memory, one atomic commit.

    Args:
        container: an existing container.
        prefix: blob-name prefix for every checkpoint.
        container_client: a ready ``ContainerClient`` for ``container``; else one is made from ``connection_string``,
            or ``account_url`` (may hold a SAS) + ``credential`` (default ``DefaultAzureCredential()``, from
            azure-identity), or the environment (see :func:`make_container_client`). Credentials never appear in
            a repr, a log line or an error message. A client you pass keeps its own settings (connection pool,
            download chunk size ``max_chunk_get_size``, timeouts, retries; its first ranged GET is
            ``max_single_get_size``). A container SAS needs the permissions ``rwdl`` for everything ckptcloud does:
            ``l`` to check the container and list, ``w`` to save, ``d`` for retention, ``r`` to load (and to save
            over an existing name). A read SAS for one blob loads it with ``check_bucket=False, require_empty=False``.
        api_version: the storage REST version, e.g. ``"2025-11-05"`` for Azurite 3.35.
        encryption_scope: an encryption scope of the account, named on every write (uploads, blocks, commits).
        cpk: a customer-provided key, ``azure.storage.blob.CustomerProvidedEncryptionKey(key_value, key_hash)``,
            sent with every write and read (the SDK sends it over HTTPS only). Not both.
        **options: the pipeline's options, passed to :class:`~ckptcloud.remote.RemoteSaver`: ``part_size``,
            ``max_concurrency`` (peak extra memory is ``(max_concurrency + 1) * part_size``), ``load_concurrency``
            (ranged GETs per load, default ``max(32, max_concurrency)``; no memory per range), ``require_empty``,
            ``check_bucket``, ``save_on_rank``, ``tmp_dir``, ``retry``, ``dedup``, ``dedup_grace``
            (content-addressed saves: see :mod:`ckptcloud.dedup`); any other keyword goes to ``torch.save``.
            Blocks are 1 MiB to 4000 MiB (default 8 MiB, 16 at once), raised automatically past 50,000 blocks.

    Example:
        >>> saver = AzureBlobSaver("ckpts", "runs/42", connection_string=conn_str)  # doctest: +SKIP
        >>> saver({"model": model.state_dict()}, "model_1.pt")  # doctest: +SKIP
    """

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        container_client: Any = None,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        api_version: str | None = None,
        encryption_scope: str | None = None,
        cpk: Any = None,
        **options: Any,
    ) -> None:
        check_bucket_name(container, "container")
        if container_client is None:
            container_client = make_container_client(
                container,
                connection_string,
                account_url,
                credential,
                api_version,
                _connections(options),
            )
        elif container_client.container_name != container:
            raise ValueError(
                f"Argument `container_client` is for container {container_client.container_name!r}, not {container!r}"
            )
        store = AzureBlobStore(container_client, encryption_scope=encryption_scope, cpk=cpk)
        super().__init__(store, prefix, **options)


def _connections(options: dict[str, Any]) -> int:
    """The most requests a saver with ``options`` sends at once (saves or loads): what its own pool must hold."""
    concurrency = check_concurrency(options.get("max_concurrency", DEFAULT_MAX_CONCURRENCY), "max_concurrency")
    return max(concurrency, resolve_load_concurrency(options.get("load_concurrency"), concurrency))
