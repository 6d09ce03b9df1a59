"""Amazon S3 (and S3-compatible servers: MinIO, SeaweedFS, Ceph, R2, ...) over boto3 multipart upload.

Integrity per request: every part and single put carries its CRC32C (``x-amz-checksum-crc32c``, computed in place
by :mod:`ckptcloud.checksum` in the part's worker thread), which the server checks before it accepts the bytes;
a mismatch (``BadDigest``) is retried from the pipeline's buffer. That makes botocore's own per-request work
redundant, so :func:`make_s3_client` turns it off: its CRC32 of every body (~0.5 CPU-s/GiB) and, over plain HTTP,
its SHA-256 payload signature (~1 CPU-s/GiB, and as much again on the server). Headers are still signed.

Time bounds: the clients :func:`make_s3_client` builds do not retry (the pipeline's ``Retry`` does, so its attempts
and deadline bound the whole call), and metadata requests (HeadBucket, HeadObject, listings, deletes, abort) wait
:data:`~ckptcloud.stores.s3_client.METADATA_READ_TIMEOUT` for an answer, data requests
:data:`~ckptcloud.stores.s3_client.DATA_READ_TIMEOUT` (see :mod:`ckptcloud.stores.s3_client`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ckptcloud.checksum import crc32c_base64
from ckptcloud.stores.base import GiB, IncompleteUpload, MiB, ObjectInfo, Precondition, Store, StoreLimits
from ckptcloud.stores.s3_args import split_extra_args
from ckptcloud.stores.s3_client import make_s3_client, metadata_client_for
from ckptcloud.stores.s3_errors import MISSING_KEY, confirm_completed, delete_error, error_code
from ckptcloud.stores.s3_errors import s3_errors as _s3_errors

__all__ = ["S3Store", "make_s3_client"]

DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's limit)


def _body(data: memoryview) -> bytes | bytearray:
    """boto3 takes bytes/bytearray, not memoryview: a view of a whole pipeline buffer passes that buffer as is;
    a partial view (the short last part, a small checkpoint) is copied, at most one part."""
    if isinstance(data.obj, bytearray) and data.nbytes == len(data.obj):
        return data.obj
    return data.tobytes()


class S3Store(Store):
    """One S3 bucket through a boto3 client (the client is thread-safe and shared by the part uploads).

    Args:
        client: a boto3 S3 client, for data requests (and for all requests unless it came from
            :func:`make_s3_client`, which pairs it with a metadata client of shorter read timeout).
        bucket: the bucket's name.
        extra_args: upload arguments for every checkpoint, e.g. ``{"ServerSideEncryption": "aws:kms"}``. Each
            request gets those its operation accepts: SSE-C keys also go to every part, complete, HEAD and GET;
            ``RequestPayer`` and ``ExpectedBucketOwner`` to every request. Keys ckptcloud sets itself
            (``Metadata``, checksums, ...) and keys that are not upload arguments raise ``ValueError`` here.
        metadata_client: the client for HEAD, list, delete and abort requests (default: see ``client``).

    Example:
        >>> import boto3
        >>> S3Store(boto3.client("s3", region_name="us-east-1"), "my-bucket").url("runs/a.pt")
        's3://my-bucket/runs/a.pt'
    """

    scheme = "s3"
    limits = StoreLimits(min_part_size=5 * MiB, max_part_size=5 * GiB, max_parts=10_000)

    def __init__(
        self, client: Any, bucket: str, *, extra_args: Mapping[str, Any] | None = None, metadata_client: Any = None
    ) -> None:
        self._args = split_extra_args(client.meta.service_model if extra_args else None, extra_args)
        self.client = client
        self.metadata_client = metadata_client or metadata_client_for(client)
        self.bucket = bucket
        self.extra_args = dict(extra_args or {})

    def _errors(self, what: str, key: str = "", client: Any = None) -> Any:
        """Translate SDK errors into builtins that name the bucket/key and the endpoint (never credentials)."""
        target = self.url(key) if key else f"s3://{self.bucket}"
        return _s3_errors(client or self.client, self.bucket, target, what, on_key=bool(key))

    def check_bucket(self) -> None:
        with self._errors("checking the bucket", client=self.metadata_client):
            self.metadata_client.head_bucket(Bucket=self.bucket, **self._args["HeadBucket"])

    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        with self._errors("put", key):
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=_body(data),
                ChecksumCRC32C=crc32c_base64(data),
                Metadata=dict(metadata),
                **_conditions(when),
                **self._args["PutObject"],
            )

    def begin(self, key: str, metadata: Mapping[str, str]) -> Any:
        args = self._args["CreateMultipartUpload"]
        with self._errors("starting a multipart upload", key):
            response = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=dict(metadata), ChecksumAlgorithm="CRC32C", **args
            )
        return key, response["UploadId"]

    def put_part(self, upload: Any, number: int, data: memoryview) -> Any:
        key, upload_id = upload
        checksum = crc32c_base64(data)
        with self._errors(f"uploading part {number}", key):
            response = self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_body(data),
                ChecksumCRC32C=checksum,
                **self._args["UploadPart"],
            )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32C": checksum}

    def complete(self, upload: Any, parts: list[Any], when: Precondition | None = None) -> None:
        """Publish the upload. A ``NoSuchUpload`` answer (some servers give it to a retried complete whose first
        response was lost) is accepted when the object at the key has the ETag these parts make."""
        from botocore.exceptions import ClientError

        key, upload_id = upload
        with self._errors("completing the multipart upload", key):
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **_conditions(when),
                    **self._args["CompleteMultipartUpload"],
                )
                return
            except ClientError as err:
                if error_code(err) != "NoSuchUpload":
                    raise
                gone = err
        confirm_completed(lambda: self.head(key).version, self.url(key), parts, gone)

    def abort(self, upload: Any) -> None:
        from botocore.exceptions import ClientError

        key, upload_id = upload
        with self._errors("aborting the multipart upload", key, self.metadata_client):
            try:
                self.metadata_client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, **self._args["AbortMultipartUpload"]
                )
            except ClientError as err:
                if error_code(err) != "NoSuchUpload":
                    raise

    def head(self, key: str) -> ObjectInfo:
        with self._errors("reading the metadata", key, self.metadata_client):
            meta = self.metadata_client.head_object(Bucket=self.bucket, Key=key, **self._args["HeadObject"])
        modified = meta["LastModified"].timestamp()
        return ObjectInfo(key, int(meta["ContentLength"]), modified, meta.get("Metadata", {}), meta.get("ETag"))

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self._args["GetObject"]}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if version is not None:
            args["IfMatch"] = version  # the ETag head() returned; 412 once the object is replaced
        with self._errors("downloading", key):
            body = self.client.get_object(**args)["Body"]
            yield from body.iter_chunks(chunk_size=1 * MiB)

    def delete(self, key: str) -> None:
        with self._errors("deleting", key, self.metadata_client):
            self.metadata_client.delete_object(Bucket=self.bucket, Key=key, **self._args["DeleteObject"])

    def delete_many(self, keys: list[str]) -> None:
        """``DeleteObjects``, 1,000 keys per request (on the data client: a batch can take seconds)."""
        keys = list(keys)
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            objects = {"Objects": [{"Key": key} for key in batch], "Quiet": True}
            with self._errors(f"deleting {len(batch)} objects"):
                response = self.client.delete_objects(Bucket=self.bucket, Delete=objects, **self._args["DeleteObjects"])
            failed = [e for e in response.get("Errors", []) if e.get("Code") not in MISSING_KEY]
            if failed:
                raise delete_error([(self.url(str(e.get("Key"))), str(e.get("Code"))) for e in failed], len(keys))

    def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        pages = self.metadata_client.get_paginator("list_objects_v2")
        with self._errors("listing", prefix, self.metadata_client):
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, **self._args["ListObjectsV2"]):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"], int(obj["Size"]), obj["LastModified"].timestamp()))
        return out

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        out: list[IncompleteUpload] = []
        pages = self.metadata_client.get_paginator("list_multipart_uploads")
        with self._errors("listing incomplete uploads", prefix, self.metadata_client):
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, **self._args["ListMultipartUploads"]):
                for u in page.get("Uploads", []):
                    if "/" not in u["Key"][len(prefix) :]:  # not other runs' uploads in sub-folders
                        out.append(IncompleteUpload(u["Key"], (u["Key"], u["UploadId"]), u["Initiated"].timestamp()))
        return out


def _conditions(when: Precondition | None) -> dict[str, str]:
    """S3's conditional-write headers: ``If-None-Match: *`` (create only) or ``If-Match: <ETag>``."""
    if when is None:
        return {}
    return {"IfNoneMatch": "*"} if when.version is None else {"IfMatch": when.version}
