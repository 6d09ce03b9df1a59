"""Google Cloud Storage over the JSON API: parallel composite uploads (parts are temporary objects, then compose).

Compose, because the pipeline uploads parts concurrently: GCS resumable uploads take chunks strictly in order, and
fake-gcs-server lacks the XML multipart API. Part *n* goes to ``{dirname(key)}/.ckptcloud-tmp/{upload_id}/part-n``
(invisible to ``RemoteSaver.list``); ``complete`` composes groups of 32 (GCS's limit) into intermediates until at most
32 remain, then once into ``key`` with the metadata, so the object appears whole or not at all; the temporaries are
deleted afterwards. (Composes do not delete their own sources: a compose retried after a lost response would find
them gone and fail although the object was published.) The SDK's own retries are off: the pipeline retries each
request, so a dead endpoint fails within the pipeline's bounds rather than the SDK's 120 s per call.

Limits: parts of 256 KiB to 5 GiB in multiples of 256 KiB (GCS's upload unit; compose has no minimum); at most 10,000
parts like S3, so part sizes match S3's (10,000 parts take 313 + 10 + 1 composes). Objects up to 5 TiB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import quote

from ckptcloud.errors import ObjectChangedError, TransientError
from ckptcloud.stores.base import GiB, IncompleteUpload, MiB, ObjectInfo, Precondition, Store, StoreLimits

MAX_COMPOSE_SOURCES = 32
TMP_FOLDER = ".ckptcloud-tmp"
_TIMEOUT = (10, 120)  # seconds to connect, and to wait for each read
_OCTET = "application/octet-stream"


class GCSUpload(NamedTuple):
    """An upload in progress: the final key, the prefix of its temporary objects, the object metadata."""

    key: str
    tmp_prefix: str
    metadata: dict[str, str]


def _conditions(when: Precondition | None) -> dict[str, str]:
    """GCS's write precondition: generation 0 (create only) or the generation :meth:`GCSStore.head` returned."""
    return {} if when is None else {"ifGenerationMatch": when.version or "0"}


class GCSStore(Store):
    """One GCS bucket through a ``google.cloud.storage.Client`` (thread-safe; shared by the part uploads).

    Example:
        >>> GCSStore(client=None, bucket="my-bucket").url("runs/a.pt")
        'gs://my-bucket/runs/a.pt'
    """

    scheme = "gs"
    limits = StoreLimits(min_part_size=MiB // 4, max_part_size=5 * GiB, max_parts=10_000, part_alignment=MiB // 4)

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @contextlib.contextmanager
    def _errors(self, what: str, key: str | None = None) -> Iterator[None]:
        """SDK/HTTP errors as builtins naming the bucket or URL, never credentials. 404 names ``key`` if given."""
        import requests
        from google.api_core import exceptions

        target = self.url(key) if key is not None else f"gs://{self.bucket}"
        try:
            yield
        except exceptions.NotFound as err:
            if key is None or "bucket does not exist" in str(err.message):
                raise FileNotFoundError(f"GCS bucket {self.bucket!r} does not exist ({what})") from err
            raise FileNotFoundError(f"no object at {target} ({what})") from err
        except exceptions.PreconditionFailed as err:  # a conditional write or a pinned read
            raise ObjectChangedError(f"{target} is not the generation expected ({what})") from err
        except (exceptions.Forbidden, exceptions.Unauthorized) as err:
            raise PermissionError(f"access denied to {target} ({what}): {err.code} {err.message}") from err
        except exceptions.RetryError as err:
            raise TransientError(f"GCS did not answer for {target} ({what}): {err}") from err
        except (exceptions.ServerError, exceptions.TooManyRequests) as err:
            raise TransientError(f"GCS answered {err.code} for {target} ({what})") from err
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            raise TransientError(f"cannot reach the GCS endpoint for {target} ({what}): {err}") from err

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One JSON-API request on the client's authorized session (bodies are views; the pipeline retries)."""
        from google.api_core import exceptions

        url = self.client._connection.get_api_base_url_for_mtls() + path
        response = self.client._http.request(method, url, timeout=_TIMEOUT, **kwargs)
        if response.status_code >= 400:
            raise exceptions.from_http_response(response)
        return response

    def _post(self, params: dict[str, str], body: Any, content_type: str) -> None:
        path = f"/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        self._request("POST", path, params=params, data=body, headers={"Content-Type": content_type})

    def check_bucket(self) -> None:
        with self._errors("checking the bucket"):  # listing needs only object rights, unlike a bucket GET
            next(iter(self.client.list_blobs(self.bucket, max_results=1, retry=None, timeout=_TIMEOUT)), None)

    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        """One multipart upload (object and metadata in one request); copies the small object once."""
        sep = uuid.uuid4().hex
        resource = json.dumps({"name": key, "contentType": _OCTET, "metadata": dict(metadata)})
        head = (
            f"--{sep}\r\nContent-Type: application/json\r\n\r\n{resource}\r\n--{sep}\r\nContent-Type: {_OCTET}\r\n\r\n"
        )
        with self._errors(f"putting {self.url(key)}"):
            body = b"".join([head.encode(), data, f"\r\n--{sep}--\r\n".encode()])
            params = {"uploadType": "multipart", **_conditions(when)}
            self._post(params, body, f"multipart/related; boundary={sep}")

    def begin(self, key: str, metadata: Mapping[str, str]) -> GCSUpload:
        folder = key.rpartition("/")[0]
        return GCSUpload(key, f"{folder}/{TMP_FOLDER}/{uuid.uuid4().hex}/".lstrip("/"), dict(metadata))

    def put_part(self, upload: GCSUpload, number: int, data: memoryview) -> str:
        # One media upload whose body is the view itself (urllib3 passes it to socket.sendall). Measured: 8 concurrent
        # parts from the pipeline's buffers to fake-gcs-server add +0.3 MiB peak RSS (16 MiB or 8 MiB parts); the
        # SDK's upload_from_string(bytes(view)) or upload_from_file(<file over view>) add +128 MiB with 16 MiB parts
        # (a copy each) and +256 MiB with 8 MiB parts (two copies).
        name = f"{upload.tmp_prefix}part-{number:05d}"
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data  # len() must count bytes
        with self._errors(f"uploading part {number} of {self.url(upload.key)}"):
            self._post({"uploadType": "media", "name": name}, view, _OCTET)
        return name

    def complete(self, upload: GCSUpload, parts: list[str], when: Precondition | None = None) -> None:
        sources, level, fan_in, tmp = list(parts), 0, MAX_COMPOSE_SOURCES, upload.tmp_prefix
        with self._errors(f"composing {len(parts)} parts into {self.url(upload.key)}"):
            while len(sources) > fan_in:  # intermediates first: the key appears only at the last compose
                level += 1
                groups = [sources[i : i + fan_in] for i in range(0, len(sources), fan_in)]
                sources = [self._compose(f"{tmp}compose-{level}-{i:05d}", g) for i, g in enumerate(groups)]
            self._compose(upload.key, sources, upload.metadata, **_conditions(when))
        try:  # the object is published: leftovers are garbage, not a failed save
            self.abort(upload)
        except Exception as err:
            logging.getLogger("ckptcloud").warning("could not delete parts under %s: %s", self.url(tmp), err)

    def _compose(
        self, name: str, sources: list[str], metadata: Mapping[str, str] | None = None, **conditions: str
    ) -> str:
        """Compose ``sources`` into ``name`` (idempotent: the sources stay until the upload is finished)."""
        bucket = self.client.bucket(self.bucket)
        blob = bucket.blob(name)
        blob.content_type = _OCTET
        if metadata:
            blob.metadata = dict(metadata)
        match = {"if_generation_match": int(conditions["ifGenerationMatch"])} if conditions else {}
        blob.compose([bucket.blob(s) for s in sources], retry=None, timeout=_TIMEOUT, **match)
        return name

    def abort(self, upload: GCSUpload) -> None:
        for info in self.list(upload.tmp_prefix):
            self.delete(info.key)

    def head(self, key: str) -> ObjectInfo:
        blob = self.client.bucket(self.bucket).blob(key)
        with self._errors("reading the metadata", key):
            blob.reload(retry=None, timeout=_TIMEOUT)
        version = None if blob.generation is None else str(blob.generation)
        return ObjectInfo(key, int(blob.size), blob.updated.timestamp(), dict(blob.metadata or {}), version)

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        folders: dict[str, float] = {}  # temporary folder of each upload -> when its first part was written
        for info in self.list(f"{prefix}{TMP_FOLDER}/"):
            folder = info.key[: info.key.index("/", len(prefix) + len(TMP_FOLDER) + 1) + 1]
            folders[folder] = min(folders.get(folder, info.last_modified or 0.0), info.last_modified or 0.0)
        return [IncompleteUpload(f, GCSUpload(f, f, {}), t) for f, t in sorted(folders.items())]

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        # ``generation=`` reads exactly that version; once it is overwritten (unversioned bucket) GCS answers 404.
        # (fake-gcs-server ignores ifGenerationMatch on downloads, but honours generation=.)
        if end is not None and end <= start:
            return
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        path = f"/download/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(key, safe='')}"
        params = {"alt": "media", **({"generation": version} if version is not None else {})}
        try:
            with self._errors("downloading", key):
                with self._request("GET", path, params=params, headers=headers, stream=True) as response:
                    yield from response.iter_content(chunk_size=1 * MiB)
        except FileNotFoundError as err:
            if version is None:
                raise
            gone = f"generation {version} is gone"
            raise ObjectChangedError(f"{self.url(key)} was replaced while it was read ({gone})") from err

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        with self._errors("deleting", key), contextlib.suppress(NotFound):
            self.client.bucket(self.bucket).delete_blob(key, retry=None, timeout=_TIMEOUT)

    def list(self, prefix: str) -> list[ObjectInfo]:
        with self._errors(f"listing {prefix!r}"):
            blobs = self.client.list_blobs(self.bucket, prefix=prefix, retry=None, timeout=_TIMEOUT)
            return [ObjectInfo(b.name, int(b.size), b.updated.timestamp(), dict(b.metadata or {})) for b in blobs]
