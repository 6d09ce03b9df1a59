"""A load replaced mid-download returns exactly one version of the object: never a mix, never a false "damaged".

Every ranged GET (and every retry of one) carries the version ``head()`` saw: S3 ``If-Match`` (ETag), GCS
``generation=``, Azure ``If-Match`` (ETag). Checked against the real emulators (moto_server, fake-gcs-server,
Azurite) and the in-memory store the unit tests use. The object is replaced between two ranges: the first range
is read whole, then the object is overwritten, then the other ranges are allowed to start.

Emulator notes (measured): moto answers ``If-Match`` on a stale ETag with 412 PreconditionFailed; Azurite answers
412 ConditionNotMet (``ResourceModifiedError``); fake-gcs-server answers 404 for a ``generation=`` that was
overwritten, but ignores ``ifGenerationMatch`` on media downloads (it serves the new bytes), which is why the GCS
adapter pins with ``generation=``.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ckptcloud.download import download_to_file
from ckptcloud.errors import IntegrityError, ObjectChangedError
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.stores.base import MiB, Store
from ckptcloud.stores.memory import MemoryStore
from tests.conftest import AZURITE_API_VERSION

FAST = Retry(max_attempts=4, initial_backoff=0.001, deadline=30)
SIZE = 3 * MiB  # three ranges of 1 MiB
STORES = ["memory", "s3", "gcs", "azure"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Store:
    """The same bucket adapter the savers use, on a fresh bucket of each emulator."""
    kind = request.param
    if kind == "memory":
        return MemoryStore("bucket")
    if kind == "s3":
        from ckptcloud.stores.s3 import S3Store

        return S3Store(request.getfixturevalue("s3_client"), request.getfixturevalue("s3_bucket"))
    if kind == "gcs":
        from ckptcloud.stores.gcs import GCSStore

        return GCSStore(request.getfixturevalue("gcs_client"), request.getfixturevalue("gcs_bucket"))
    from ckptcloud.stores.azure import AzureBlobStore, make_container_client

    container = request.getfixturevalue("azure_container")
    endpoint = request.getfixturevalue("azure_endpoint")
    return AzureBlobStore(make_container_client(container, endpoint.url, api_version=AZURITE_API_VERSION))


def version_body(tag: int, size: int = SIZE) -> bytes:
    """``size`` bytes that say which version they are at every offset (so a mix is visible anywhere)."""
    return bytes([tag]) * size


class ReplaceBetweenRanges:
    """Wraps ``store.read``/``store.head``: in each download attempt, the first range is read whole, then ``key`` is
    overwritten with the next of ``replacements``, and only then may the other ranges start (waits bounded at 10 s).
    """

    def __init__(self, store: Store, key: str, replacements: list[bytes], put: Callable[[bytes], None]) -> None:
        self.store, self.key, self.replacements, self.put = store, key, list(replacements), put
        self.heads = 0
        self._lock = threading.Lock()
        self._first_taken = False
        self._replaced = threading.Event()
        self._read, self._head = store.read, store.head
        store.read = self.read  # type: ignore[method-assign]
        store.head = self.head  # type: ignore[method-assign]

    def head(self, key: str) -> Any:
        with self._lock:  # a new download attempt: its first range goes first again
            self.heads += 1
            self._first_taken = False
            self._replaced.clear()
        return self._head(key)

    def read(self, key: str, start: int = 0, end: int | None = None, **kwargs: Any) -> Iterator[bytes]:
        with self._lock:
            first, self._first_taken = not self._first_taken, True
        if not first:
            assert self._replaced.wait(10), "the first range never finished"
            yield from self._read(key, start, end, **kwargs)
            return
        try:
            yield from self._read(key, start, end, **kwargs)
            with self._lock:
                body = self.replacements.pop(0) if self.replacements else None
            if body is not None:
                self.put(body)
        finally:
            self._replaced.set()


def put_raw(store: Store, key: str) -> Callable[[bytes], None]:
    return lambda body: store.put(key, memoryview(body), {})


def download(store: Store, key: str, **options: Any) -> bytes:
    with tempfile.TemporaryFile() as file:
        size = download_to_file(store, key, file, part_size=MiB, max_concurrency=3, retry=FAST, **options)
        file.seek(0)
        data = file.read()
    assert len(data) == size
    return data


# ----------------------------------------------------------------------------------------------- the store
def test_head_returns_the_version_and_a_read_pinned_to_a_replaced_version_fails_clearly(store):
    store.put("obj", memoryview(version_body(1, 1000)), {})
    old = store.head("obj").version
    assert old, "head() should return the object's version (ETag or generation)"
    assert b"".join(store.read("obj", 10, 20, version=old)) == version_body(1, 10)
    store.put("obj", memoryview(version_body(2, 1000)), {})
    new = store.head("obj").version
    assert new and new != old
    with pytest.raises(ObjectChangedError, match="obj"):
        b"".join(store.read("obj", 10, 20, version=old))
    assert b"".join(store.read("obj", 10, 20, version=new)) == version_body(2, 10)


# ----------------------------------------------------------------------------------------------- the loads
def test_a_raw_object_replaced_between_two_ranges_loads_as_exactly_one_version(store):
    store.put("obj", memoryview(version_body(1)), {})
    hook = ReplaceBetweenRanges(store, "obj", [version_body(2)], put_raw(store, "obj"))
    data = download(store, "obj")
    assert data in (version_body(1), version_body(2)), f"mixed versions: {sorted(set(data))}"
    assert data == version_body(2)  # the download restarted from a fresh head() and read the new one whole
    assert hook.heads == 2


def test_an_object_that_keeps_changing_fails_with_a_clear_error_not_a_mix(store):
    store.put("obj", memoryview(version_body(1)), {})
    ReplaceBetweenRanges(store, "obj", [version_body(2), version_body(3)], put_raw(store, "obj"))
    with pytest.raises(ObjectChangedError, match="kept changing while it was loaded"):
        download(store, "obj")


def test_a_checkpoint_replaced_mid_load_loads_whole_and_is_never_reported_damaged(store):
    elements = 3 * 1024 * 1024  # 12 MiB of float32: loaded as three ranges (5, 5 and 2 MiB)
    reference = RemoteSaver(MemoryStore("ref"), part_size=5 * MiB)
    reference({"w": torch.full((elements,), 2.0)}, "model.pt")
    newer = reference.store.objects["model.pt"][0]

    saver = RemoteSaver(store, "run", part_size=5 * MiB, max_concurrency=3, retry=FAST)
    saver({"w": torch.full((elements,), 1.0)}, "model.pt")
    ReplaceBetweenRanges(store, "run/model.pt", [newer], put_raw(store, "run/model.pt"))
    try:
        loaded = saver.load("model.pt")["w"]
    except IntegrityError as err:  # the bug this guards against: a mix reported as damage
        pytest.fail(f"a replaced checkpoint was reported damaged: {err}")
    assert bool((loaded == loaded[0]).all()), "the load mixed two versions"
    assert float(loaded[0]) == 2.0


def test_a_retried_range_stays_pinned_to_the_version_it_started_with():
    """A range that breaks mid-body resumes with the same version: the replaced object is not appended to it."""

    class BreaksOnceThenReplaced(MemoryStore):
        broke = False

        def read(self, key: str, start: int = 0, end: int | None = None, **kwargs: Any) -> Iterator[bytes]:
            body = b"".join(super().read(key, start, end, **kwargs))
            if not self.broke:
                self.broke = True
                yield body[:1000]
                self.put(key, memoryview(version_body(2)), {})  # replaced while the connection was down
                raise ConnectionResetError("connection reset mid-body")
            yield body

    store = BreaksOnceThenReplaced("bucket")
    store.put("obj", memoryview(version_body(1)), {})
    with tempfile.TemporaryFile() as file:
        download_to_file(store, "obj", file, part_size=SIZE, max_concurrency=1, retry=FAST)
        file.seek(0)
        assert file.read() == version_body(2)
