"""Google Cloud Storage over the JSON API: parallel composite uploads (default), or one resumable upload per object.

``upload="composite"``: parts uploaded concurrently as temporary objects under ``.ckptcloud-tmp/``, then composed
into the key, which appears whole or not at all (:mod:`ckptcloud.stores.gcs_compose`). Deleted temporaries are billed
again under the bucket's soft-delete retention (7 days by default), and in Nearline/Coldline/Archive buckets for
their minimum storage duration.

``upload="resumable"``: no temporary object; one stream, parts sent in order (:mod:`ckptcloud.stores.gcs_resumable`).

Encryption: ``kms_key_name`` (a Cloud KMS key: ``kmsKeyName`` on every upload, compose and session) or
``encryption_key`` (32 bytes, a customer-supplied key: its headers on every upload, compose, session request and
download; compose requires its sources under the same key, which they are). Metadata reads, listings and deletes
need no key (GCS encrypts metadata with its own keys).

Every request is the client's authorized session with no retry of its own (the pipeline retries), a connect timeout
of ``CONNECT_TIMEOUT`` and a read timeout of ``METADATA_READ_TIMEOUT`` (the bucket check, head, listing, delete,
session start) or ``DATA_READ_TIMEOUT`` (parts, compose, downloads). Errors: :mod:`ckptcloud.stores.gcs_http`.

Limits: parts of 256 KiB to 5 GiB in multiples of 256 KiB; at most 10,000 parts like S3, so part sizes match S3's
(10,000 parts take 313 + 10 + 1 composes). Objects up to 5 TiB.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import quote

from ckptcloud.errors import ObjectChangedError
from ckptcloud.stores import gcs_http as ops
from ckptcloud.stores.base import GiB, IncompleteUpload, MiB, ObjectInfo, Precondition, Store, StoreLimits
from ckptcloud.stores.gcs_options import check_options
from ckptcloud.stores.gcs_resumable import ResumableUpload, start_session

MAX_COMPOSE_SOURCES = 32
TMP_FOLDER = ".ckptcloud-tmp"
CONNECT_TIMEOUT = 10.0  # seconds
METADATA_READ_TIMEOUT = 20.0  # a hung endpoint fails the bucket check in about 6 x 20 s under the default Retry
DATA_READ_TIMEOUT = 120.0
_OCTET = "application/octet-stream"


class GCSUpload(NamedTuple):
    """A composite upload in progress: the final key, the prefix of its temporary objects, the object metadata."""

    key: str
    tmp_prefix: str
    metadata: dict[str, str]


def _conditions(when: Precondition | None) -> dict[str, str]:
    """GCS's write precondition: generation 0 (create only) or the generation :meth:`GCSStore.head` returned."""
    return {} if when is None else {"ifGenerationMatch": when.version or "0"}


class GCSStore(Store):
    """One GCS bucket through a ``google.cloud.storage.Client`` (its authorized session is shared by the parts).

    Args:
        client: the ``google.cloud.storage.Client`` (its credentials and endpoint are used, not its retries).
        bucket: the bucket name.
        upload: ``"composite"`` (parallel parts as temporary objects, composed) or ``"resumable"`` (one session).
        kms_key_name: ``projects/P/locations/L/keyRings/R/cryptoKeys/K`` to encrypt every object written.
        encryption_key: a 32-byte customer-supplied AES-256 key (https only, or an emulator on this machine).

    Example:
        >>> GCSStore(client=None, bucket="my-bucket").url("runs/a.pt")
        'gs://my-bucket/runs/a.pt'
    """

    scheme = "gs"
    limits = StoreLimits(min_part_size=MiB // 4, max_part_size=5 * GiB, max_parts=10_000, part_alignment=MiB // 4)

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        upload: str = "composite",
        kms_key_name: str | None = None,
        encryption_key: bytes | None = None,
    ) -> None:
        self._enc = check_options(client, upload, kms_key_name, encryption_key)
        self.client, self.bucket, self.upload = client, bucket, upload
        self._kms, self._csek = self._enc.params, self._enc.headers
        self._http = ops.Transport(client, lambda: [self._enc.secret])
        self._b = quote(bucket, safe="")

    def __repr__(self) -> str:
        return f"GCSStore(bucket={self.bucket!r}, upload={self.upload!r}, encryption={self._enc.describe()!r})"

    # ------------------------------------------------------------------------------------------- requests
    def _call(
        self, op: ops.Operation, method: str, url: str, *, target: str, detail: str = "", ok: tuple[int, ...] = (),
        missing: Any = None, secret_url: bool = False, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """One request; an HTTP error answer (status >= 400 and not in ``ok``) raises the builtin for it."""
        doing = op.doing(target, detail)
        timeout = (CONNECT_TIMEOUT, METADATA_READ_TIMEOUT if op.metadata else DATA_READ_TIMEOUT)
        response = self._http.send(method, url, doing=doing, timeout=timeout, secret_url=secret_url, **kwargs)
        if response.status_code < 400 or response.status_code in ok:
            return response
        message = self._http.message(response)
        response.close()
        raise ops.http_error(response.status_code, message, op, doing, target, missing or self._missing(target, doing))

    def _no_bucket(self, doing: str) -> Any:
        """For requests where a 404 can only mean the bucket (uploads and listings)."""
        return lambda message: ops.no_bucket(self.bucket, doing)

    def _missing(self, target: str, doing: str) -> Any:
        """A 404 on an object: the bucket if GCS says so, else the object."""
        return lambda message: (
            ops.no_bucket(self.bucket, doing)
            if ops.bucket_missing(message)
            else FileNotFoundError(f"no object at {target} ({doing})")
        )

    def _object_path(self, key: str) -> str:
        return f"/storage/v1/b/{self._b}/o/{quote(key, safe='')}"

    def _upload(self, op: ops.Operation, target: str, params: dict, body: Any, content_type: str, **kw: Any) -> Any:
        headers = {"Content-Type": content_type, **self._csek}
        doing = op.doing(target, kw.get("detail", ""))
        return self._call(
            op, "POST", f"/upload/storage/v1/b/{self._b}/o", target=target, missing=self._no_bucket(doing),
            params={**params, **self._kms}, data=body, headers=headers, **kw,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------- the contract
    def check_bucket(self) -> None:
        target = f"gs://{self.bucket}"  # listing needs only object rights, unlike a bucket GET
        missing = self._no_bucket(ops.CHECK.doing(target))
        self._call(ops.CHECK, "GET", f"/storage/v1/b/{self._b}/o", target=target, missing=missing,
                   params={"maxResults": "1"}).close()  # fmt: skip

    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        """One multipart upload (object and metadata in one request); copies the small object once."""
        sep = uuid.uuid4().hex
        resource = json.dumps({"name": key, "contentType": _OCTET, "metadata": dict(metadata)})
        head = f"--{sep}\r\nContent-Type: application/json\r\n\r\n{resource}\r\n--{sep}\r\n"
        head += f"Content-Type: {_OCTET}\r\n\r\n"
        body = b"".join([head.encode(), data, f"\r\n--{sep}--\r\n".encode()])
        params = {"uploadType": "multipart", **_conditions(when)}
        self._upload(ops.PUT, self.url(key), params, body, f"multipart/related; boundary={sep}").close()

    def begin(self, key: str, metadata: Mapping[str, str]) -> GCSUpload | ResumableUpload:
        if self.upload == "resumable":
            return start_session(self, key, metadata)
        folder = key.rpartition("/")[0]
        return GCSUpload(key, f"{folder}/{TMP_FOLDER}/{uuid.uuid4().hex}/".lstrip("/"), dict(metadata))

    def put_part(self, upload: GCSUpload | ResumableUpload, number: int, data: memoryview) -> str | int:
        # The body is the view itself (urllib3 passes it to socket.sendall): no copy. Measured (composite): 8
        # concurrent parts add +0.3 MiB peak RSS; the SDK's upload_from_string(bytes(view)) added a copy per part.
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data  # len() must count bytes
        if isinstance(upload, ResumableUpload):
            return upload.put_part(self._call, number, view, self._csek)
        name = f"{upload.tmp_prefix}part-{number:05d}"
        params = {"uploadType": "media", "name": name}
        self._upload(ops.PART, self.url(upload.key), params, view, _OCTET, detail=str(number)).close()
        return name

    def complete(self, upload: GCSUpload | ResumableUpload, parts: list[Any], when: Precondition | None = None) -> None:
        if isinstance(upload, ResumableUpload):
            upload.finish(self._call, when, self._csek)
            return
        from ckptcloud.stores.gcs_compose import compose_all

        compose_all(self, upload, parts, when)

    def _compose(
        self, name: str, sources: list[str], metadata: Mapping[str, str] | None = None, **conditions: str
    ) -> str:
        """Compose ``sources`` into ``name`` (idempotent: the sources stay until the upload is finished)."""
        destination: dict[str, Any] = {"contentType": _OCTET}
        if metadata:
            destination["metadata"] = dict(metadata)
        body = json.dumps({"sourceObjects": [{"name": s} for s in sources], "destination": destination})
        target = self.url(name)
        self._call(
            ops.COMPOSE, "POST", f"{self._object_path(name)}/compose", target=target, detail=str(len(sources)),
            params={**conditions, **self._kms}, data=body, headers={"Content-Type": "application/json", **self._csek},
        ).close()  # fmt: skip
        return name

    def abort(self, upload: GCSUpload | ResumableUpload) -> None:
        if isinstance(upload, ResumableUpload):
            upload.cancel(self._call)
            return
        for info in self.list(upload.tmp_prefix):
            self.delete(info.key)

    def head(self, key: str) -> ObjectInfo:
        """Metadata without the encryption key (GCS does not need it; the hashes it then omits are not used)."""
        target = self.url(key)
        response = self._call(ops.HEAD, "GET", self._object_path(key), target=target)
        return ops.object_info(response.json(), version=True)

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        """Composite uploads' temporary folders (resumable sessions cannot be listed: GCS drops them after a week)."""
        folders: dict[str, float] = {}  # temporary folder of each upload -> when its first part was written
        for info in self.list(f"{prefix}{TMP_FOLDER}/"):
            folder = info.key[: info.key.index("/", len(prefix) + len(TMP_FOLDER) + 1) + 1]
            folders[folder] = min(folders.get(folder, info.last_modified or 0.0), info.last_modified or 0.0)
        return [IncompleteUpload(f, GCSUpload(f, f, {}), t) for f, t in sorted(folders.items())]

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        # ``generation=`` reads exactly that version; once it is overwritten (unversioned bucket) GCS answers 404.
        # (fake-gcs-server ignores ifGenerationMatch on downloads, but honours generation=.)
        import requests

        if end is not None and end <= start:
            return
        target, doing = self.url(key), ops.DOWNLOAD.doing(self.url(key))
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        params = {"alt": "media", **({"generation": version} if version is not None else {})}
        missing = self._missing(target, doing)
        if version is not None:
            gone = f"{target} was replaced while it was read (generation {version} is gone)"
            missing = lambda message: ObjectChangedError(gone)  # noqa: E731
        path = f"/download/storage/v1/b/{self._b}/o/{quote(key, safe='')}"
        response = self._call(ops.DOWNLOAD, "GET", path, target=target, missing=missing, params=params,
                              headers={**headers, **self._csek}, stream=True)  # fmt: skip
        with response:
            try:
                yield from response.iter_content(chunk_size=1 * MiB)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                raise self._http.network_error(err, doing, (CONNECT_TIMEOUT, DATA_READ_TIMEOUT)) from err

    def delete(self, key: str) -> None:
        target = self.url(key)
        response = self._call(ops.DELETE, "DELETE", self._object_path(key), target=target, ok=(404,))
        if response.status_code == 404:
            message = self._http.message(response)
            if ops.bucket_missing(message):
                raise ops.no_bucket(self.bucket, ops.DELETE.doing(target))
        response.close()

    def list(self, prefix: str) -> list[ObjectInfo]:
        target = self.url(prefix)
        missing, infos, token = self._no_bucket(ops.LIST.doing(target)), [], None
        while True:
            params = {"prefix": prefix, "maxResults": "1000", **({"pageToken": token} if token else {})}
            page = self._call(ops.LIST, "GET", f"/storage/v1/b/{self._b}/o", target=target, missing=missing,
                              params=params).json()  # fmt: skip
            infos.extend(ops.object_info(item) for item in page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return infos
