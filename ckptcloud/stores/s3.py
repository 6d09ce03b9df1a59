"""Amazon S3 (and S3-compatible servers: MinIO, SeaweedFS, Ceph, R2, ...) over boto3 multipart upload.

Integrity per request: every part and single put carries its CRC32C (``x-amz-checksum-crc32c``, computed in place
by :mod:`ckptcloud.checksum` in the part's worker thread), which the server checks before it accepts the bytes;
a mismatch (``BadDigest``) is retried from the pipeline's buffer. That makes botocore's own per-request work
redundant, so :func:`make_s3_client` turns it off: its CRC32 of every body (~0.5 CPU-s/GiB) and, over plain HTTP,
its SHA-256 payload signature (~1 CPU-s/GiB, and as much again on the server). Headers are still signed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from ckptcloud.checksum import crc32c_base64
from ckptcloud.errors import ObjectChangedError, TransientError
from ckptcloud.stores.base import GiB, IncompleteUpload, MiB, ObjectInfo, Precondition, Store, StoreLimits

_MISSING_BUCKET = {"NoSuchBucket"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}
# BadDigest: the bytes the server got do not match their CRC32C (damaged in transit); resent from our buffer.
_TRANSIENT = {
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "503", "500", "BadDigest",
}  # fmt: skip
_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict")  # a failed conditional request


def _body(data: memoryview) -> bytes | bytearray:
    """boto3 takes bytes/bytearray, not memoryview: a view of a whole pipeline buffer passes that buffer as is;
    a partial view (the short last part, a small checkpoint) is copied, at most one part."""
    if isinstance(data.obj, bytearray) and data.nbytes == len(data.obj):
        return data.obj
    return data.tobytes()


class S3Store(Store):
    """One S3 bucket through a boto3 client (the client is thread-safe and shared by the part uploads).

    Example:
        >>> import boto3
        >>> S3Store(boto3.client("s3", region_name="us-east-1"), "my-bucket").url("runs/a.pt")
        's3://my-bucket/runs/a.pt'
    """

    scheme = "s3"
    limits = StoreLimits(min_part_size=5 * MiB, max_part_size=5 * GiB, max_parts=10_000)

    def __init__(self, client: Any, bucket: str, *, extra_args: Mapping[str, Any] | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.extra_args = dict(extra_args or {})
        if any(name.startswith("Checksum") for name in self.extra_args):
            raise ValueError(
                "Argument `extra_args` should not set checksums: every part already carries its CRC32C, "
                f"but given {sorted(n for n in self.extra_args if n.startswith('Checksum'))}"
            )

    @contextlib.contextmanager
    def _errors(self, what: str, key: str = "") -> Iterator[None]:
        """Translate SDK errors into builtins that name the bucket/key (never credentials)."""
        from botocore import exceptions as boto

        target = self.url(key) if key else f"s3://{self.bucket}"
        try:
            yield
        except boto.ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _MISSING_BUCKET or (code in _MISSING_KEY and not key):
                raise FileNotFoundError(f"S3 bucket {self.bucket!r} does not exist ({what})") from err
            if code in _MISSING_KEY:
                raise FileNotFoundError(f"no object at {target} ({what})") from err
            if code in _DENIED:
                raise PermissionError(f"access denied to {target} ({what}): {code}") from err
            if code in _CONDITION_FAILED or status == 412:  # a conditional request: the object is another version
                raise ObjectChangedError(f"{target} is not the version expected ({what}): its ETag changed") from err
            if code in _TRANSIENT or status >= 500:
                raise TransientError(f"S3 answered {code or status} for {target} ({what})") from err
            raise
        except (boto.ConnectionError, boto.HTTPClientError, boto.ResponseStreamingError) as err:
            raise TransientError(f"cannot reach the S3 endpoint for {target} ({what}): {err}") from err

    def check_bucket(self) -> None:
        with self._errors("checking the bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        with self._errors("put", key):
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=_body(data),
                ChecksumCRC32C=crc32c_base64(data),
                Metadata=dict(metadata),
                **_conditions(when),
                **self.extra_args,
            )

    def begin(self, key: str, metadata: Mapping[str, str]) -> Any:
        with self._errors("starting a multipart upload", key):
            response = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=dict(metadata), ChecksumAlgorithm="CRC32C", **self.extra_args
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
            )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32C": checksum}

    def complete(self, upload: Any, parts: list[Any], when: Precondition | None = None) -> None:
        key, upload_id = upload
        with self._errors("completing the multipart upload", key):
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **_conditions(when),
            )

    def abort(self, upload: Any) -> None:
        key, upload_id = upload
        with self._errors("aborting the multipart upload", key):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except self.client.exceptions.NoSuchUpload:
                pass

    def head(self, key: str) -> ObjectInfo:
        with self._errors("reading the metadata", key):
            meta = self.client.head_object(Bucket=self.bucket, Key=key)
        modified = meta["LastModified"].timestamp()
        return ObjectInfo(key, int(meta["ContentLength"]), modified, meta.get("Metadata", {}), meta.get("ETag"))

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if version is not None:
            args["IfMatch"] = version  # the ETag head() returned; 412 once the object is replaced
        with self._errors("downloading", key):
            body = self.client.get_object(**args)["Body"]
            yield from body.iter_chunks(chunk_size=1 * MiB)

    def delete(self, key: str) -> None:
        with self._errors("deleting", key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        with self._errors("listing", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"], int(obj["Size"]), obj["LastModified"].timestamp()))
        return out

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        out: list[IncompleteUpload] = []
        with self._errors("listing incomplete uploads", prefix):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                for u in page.get("Uploads", []):
                    if "/" not in u["Key"][len(prefix) :]:  # not other runs' uploads in sub-folders
                        out.append(IncompleteUpload(u["Key"], (u["Key"], u["UploadId"]), u["Initiated"].timestamp()))
        return out


def _conditions(when: Precondition | None) -> dict[str, str]:
    """S3's conditional-write headers: ``If-None-Match: *`` (create only) or ``If-Match: <ETag>``."""
    if when is None:
        return {}
    return {"IfNoneMatch": "*"} if when.version is None else {"IfMatch": when.version}


def make_s3_client(
    *, endpoint_url: str | None = None, region_name: str | None = None, max_concurrency: int = 10
) -> Any:
    """A boto3 S3 client from the standard credential chain (env, profile, SSO, instance/role).

    A custom endpoint (argument, or boto3's ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) gets path-style
    addressing, which MinIO, SeaweedFS and most S3-compatible servers need.
    """
    import os

    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:
        raise ImportError("S3Saver needs boto3: pip install ckptcloud[s3]") from err

    custom_endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    s3: dict[str, Any] = {"payload_signing_enabled": False}  # each body carries its CRC32C instead (see above)
    if custom_endpoint:
        s3["addressing_style"] = "path"
    config = Config(
        max_pool_connections=max(10, max_concurrency + 2),
        retries={"mode": "standard", "max_attempts": 3},  # inside each of the pipeline's own attempts
        connect_timeout=10,
        read_timeout=120,
        s3=s3,
        request_checksum_calculation="when_required",  # we send CRC32C ourselves; no second checksum per body
        response_checksum_validation="when_required",  # whole checkpoints are verified by their trailer on load
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region_name, config=config)
