"""``GCSSaver(..., upload="resumable")``: one resumable session per object, parts in order, no temporary objects.

On fake-gcs-server: round trips, nothing visible before ``complete``, no temporary object ever, abort, failures,
the conditional commit's client side. fake-gcs-server ignores a session's ``ifGenerationMatch`` and finishes an
upload when asked for its status, so GCS's documented session protocol (308 + ``Range``, status query after a lost
answer, 412 at the end) is checked against :class:`GCSSessions`, a loopback server that follows it.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud.errors import ObjectChangedError, RunConflictError, TransientError
from ckptcloud.retry import Retry
from ckptcloud.savers import GCSSaver
from ckptcloud.stores.base import Precondition
from ckptcloud.stores.gcs import TMP_FOLDER, GCSStore
from tests.helpers import assert_same, stored_bytes
from tests.integration.gcs_stubs import Stub, client, gcs_error, keys, object_bytes, recording_client

KiB = 1024
MiB = 1024 * KiB
pytestmark = pytest.mark.integration


def resumable(bucket: str, gcs_client, prefix: str = "run", **options) -> GCSSaver:
    return GCSSaver(bucket, prefix, client=gcs_client, upload="resumable", part_size=256 * KiB, **options)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("max_concurrency", [1, 2, 5])
def test_a_resumable_save_never_writes_a_temporary_object_nor_shows_the_object_before_it_completes(
    gcs_client, gcs_bucket, max_concurrency
):
    listings: list[list[str]] = []
    state = {"w": torch.randn(640 * KiB), "b": torch.arange(1000)}  # 2.5 MiB: 11 parts of 256 KiB, the last short
    saver = resumable(gcs_bucket, gcs_client, max_concurrency=max_concurrency,
                      progress=lambda done, total: listings.append(keys(gcs_client, gcs_bucket)))  # fmt: skip
    saver(state, "ckpt.pt", metadata={"run": "r1", "priority": 3})
    assert len(listings) >= 10 and all(listing == [] for listing in listings)  # during the upload: nothing
    assert keys(gcs_client, gcs_bucket) == ["run/ckpt.pt"]
    assert object_bytes(gcs_client, gcs_bucket, "run/ckpt.pt") == stored_bytes(state)
    assert saver.store.head("run/ckpt.pt").metadata["ckptcloud_run"] == "r1"
    assert_same(state, saver.load("ckpt.pt"))


@pytest.mark.parametrize(
    "sizes",
    [[256 * KiB, 256 * KiB, 100], [256 * KiB, 256 * KiB], [512 * KiB, 300 * KiB], [100]],
    ids=["short-last", "aligned-last", "unaligned-last", "one-short"],
)
def test_parts_handed_over_in_any_order_are_stored_in_order(gcs_client, gcs_bucket, sizes):
    store = GCSStore(gcs_client, gcs_bucket, upload="resumable")
    upload = store.begin("r/m.pt", {"ckptcloud_run": "x"})
    parts = [bytes([n]) * size for n, size in enumerate(sizes, 1)]
    threads = [
        threading.Thread(target=store.put_part, args=(upload, n, memoryview(data)))
        for n, data in reversed(list(enumerate(parts, 1)))  # the last part first: it waits for the others
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=30)
    assert keys(gcs_client, gcs_bucket) == []
    store.complete(upload, list(range(1, len(parts) + 1)))
    assert object_bytes(gcs_client, gcs_bucket, "r/m.pt") == b"".join(parts)
    assert store.head("r/m.pt").metadata == {"ckptcloud_run": "x"}
    assert "upload_id" not in repr(upload) and "http" not in repr(upload)  # the session URL authorizes uploads


def test_abort_cancels_the_session_and_nothing_appears(gcs_endpoint, gcs_bucket):
    recording, recorder = recording_client(gcs_endpoint.url)
    store = GCSStore(recording, gcs_bucket, upload="resumable")
    upload = store.begin("r/m.pt", {})
    for n in (1, 2):
        store.put_part(upload, n, memoryview(bytearray(256 * KiB)))
    store.abort(upload)
    store.abort(upload)
    assert [m for m, url, _ in recorder.sent if "upload_id=" in url] == ["PUT", "PUT", "DELETE", "DELETE"]
    with pytest.raises(FileNotFoundError, match=r"resumable upload session of gs://.*/r/m\.pt no longer exists"):
        store.complete(upload, [1, 2])
    assert keys(recording, gcs_bucket) == []


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("exc", [PermissionError, KeyboardInterrupt])
def test_a_failed_resumable_save_publishes_nothing_and_keeps_the_older_object(
    gcs_client, gcs_bucket, monkeypatch, k, exc
):
    from ckptcloud.stores.gcs_resumable import ORDER_GRACE, ResumableUpload

    saver = resumable(gcs_bucket, gcs_client, max_concurrency=4)
    old = {"w": torch.randn(MiB // 2)}  # 2 MiB: a resumable upload too
    saver(old, "same.pt")
    old_bytes = object_bytes(gcs_client, gcs_bucket, "run/same.pt")
    original = ResumableUpload._send

    def failing(self, call, number, data, headers):
        if number > k:
            raise exc(f"injected at part {number}")
        return original(self, call, number, data, headers)

    monkeypatch.setattr(ResumableUpload, "_send", failing)
    start = time.monotonic()
    with pytest.raises(exc, match=f"injected at part {k + 1}"):
        saver({"w": torch.randn(2 * MiB)}, "same.pt")  # 8 MiB: 33 parts, 4 waiting for their turn
    assert time.monotonic() - start < ORDER_GRACE  # the waiting parts did not wait it out
    assert keys(gcs_client, gcs_bucket) == ["run/same.pt"]
    assert object_bytes(gcs_client, gcs_bucket, "run/same.pt") == old_bytes


def test_a_part_that_fails_once_is_retried_and_the_stream_stays_in_order(gcs_client, gcs_bucket, monkeypatch):
    from ckptcloud.stores.gcs_resumable import ResumableUpload

    saver = resumable(gcs_bucket, gcs_client, max_concurrency=4, retry=Retry(initial_backoff=0.05))
    original, failed = ResumableUpload._send, []

    def flaky(self, call, number, data, headers):
        if number == 3 and not failed:
            failed.append(number)
            raise TransientError("injected: connection reset before part 3 was sent")
        return original(self, call, number, data, headers)

    monkeypatch.setattr(ResumableUpload, "_send", flaky)
    state = {"w": torch.randn(MiB)}
    saver(state, "m.pt")
    assert failed == [3]
    assert object_bytes(gcs_client, gcs_bucket, "run/m.pt") == stored_bytes(state)


def test_a_part_whose_predecessor_never_comes_gives_up_its_turn_instead_of_hanging(gcs_client, gcs_bucket, monkeypatch):
    from ckptcloud.stores import gcs_resumable

    monkeypatch.setattr(gcs_resumable, "ORDER_GRACE", 0.5)
    store = GCSStore(gcs_client, gcs_bucket, upload="resumable")
    upload = store.begin("k.pt", {})
    start = time.monotonic()  # part 1 is never handed over (the pipeline skips queued parts once a save failed)
    with pytest.raises(TransientError, match=r"part 2 of gs://.*/k\.pt waited 0\.5 s for part 1, which is not being"):
        store.put_part(upload, 2, memoryview(b"b" * (256 * KiB)))
    assert time.monotonic() - start < 2
    store.put_part(upload, 1, memoryview(b"a" * (256 * KiB)))  # a retry of part 2 then finds its turn
    store.put_part(upload, 2, memoryview(b"b" * (256 * KiB)))
    store.complete(upload, [1, 2])
    assert object_bytes(gcs_client, gcs_bucket, "k.pt") == b"a" * (256 * KiB) + b"b" * (256 * KiB)


def test_cleanup_incomplete_cannot_discard_a_running_resumable_upload(gcs_client, gcs_bucket):
    store = resumable(gcs_bucket, gcs_client).store
    upload = store.begin("run/m.pt", {})
    store.put_part(upload, 1, memoryview(b"a" * (256 * KiB)))
    assert GCSSaver(gcs_bucket, "run", client=gcs_client).cleanup_incomplete(older_than=0) == []
    store.put_part(upload, 2, memoryview(b"b" * 10))
    store.complete(upload, [1, 2])
    assert object_bytes(gcs_client, gcs_bucket, "run/m.pt") == b"a" * (256 * KiB) + b"b" * 10
    assert not [k for k in keys(gcs_client, gcs_bucket) if TMP_FOLDER in k]


# -------------------------------------------------------------------------------------- conditional commits
def test_a_resumable_commit_replaces_only_the_generation_it_began_on(gcs_client, gcs_bucket):
    store = GCSStore(gcs_client, gcs_bucket, upload="resumable")
    store.put("k.pt", memoryview(b"old"), {})
    seen = store.head("k.pt").version
    upload = store.begin("k.pt", {})
    store.put_part(upload, 1, memoryview(b"new" * 100))
    with pytest.raises(ObjectChangedError):
        store.complete(upload, [1], Precondition())  # create-only: the object exists
    store.complete(upload, [1], Precondition(seen))  # the retry streaming._publish sends after its head
    assert object_bytes(gcs_client, gcs_bucket, "k.pt") == b"new" * 100


def test_an_object_replaced_during_a_resumable_upload_is_never_overwritten(gcs_client, gcs_bucket):
    store = GCSStore(gcs_client, gcs_bucket, upload="resumable")
    store.put("k.pt", memoryview(b"old"), {})
    upload = store.begin("k.pt", {})
    store.put_part(upload, 1, memoryview(b"mine" * 100))
    store.put("k.pt", memoryview(b"theirs"), {})  # another writer, meanwhile
    with pytest.raises(ObjectChangedError):
        store.complete(upload, [1], Precondition())
    with pytest.raises(ObjectChangedError, match=r"k\.pt changed while it was uploaded.*nothing was published"):
        store.complete(upload, [1], Precondition(store.head("k.pt").version))
    assert object_bytes(gcs_client, gcs_bucket, "k.pt") == b"theirs"


def test_a_second_job_never_replaces_the_first_jobs_checkpoint_with_resumable_uploads(gcs_client, gcs_bucket):
    first_model, second_model = torch.nn.Linear(256, 512), torch.nn.Linear(256, 512)  # 0.5 MiB: parts
    first = Checkpoint({"model": first_model}, resumable(gcs_bucket, gcs_client, "shared"), n_saved=2)
    second = Checkpoint({"model": second_model}, resumable(gcs_bucket, gcs_client, "shared"), n_saved=2)
    assert first.save(global_step=1) == "model_1.pt"
    with pytest.raises(RunConflictError, match=f"another run \\(id {first.run_id}\\) wrote it"):
        second.save(global_step=1)
    assert_same(first_model.state_dict(), first.save_handler.load("model_1.pt"))


# ------------------------------------------------------------------- GCS's session protocol (loopback server)
class GCSSessions:
    """Resumable sessions as GCS documents them: chunks must start where the session stands and are answered 308
    with ``Range: bytes=0-N``; ``bytes */*`` asks for the status; the request with the total finishes the upload
    (200, the object resource) if the session's ``ifGenerationMatch`` holds, else 412. ``fault`` misbehaves once."""

    def __init__(self, fault: str = "", generation: int = 0) -> None:
        self.fault, self.generation = fault, generation
        self.data, self.finished, self.chunks, self.asked = bytearray(), False, 0, 0
        self.condition = ""
        self.stub = Stub(self.route).__enter__()

    def route(self, method, path, query, headers, body):
        if method == "GET" and path == "/storage/v1/b/b/o":
            return 200, {}, {"items": []}
        if method == "GET" and path.startswith("/storage/v1/b/b/o/"):
            if not self.generation:
                return gcs_error(404, "No such object: b/k.pt")
            item = {"name": "k.pt", "size": "1", "generation": str(self.generation), "updated": "2026-12-01T00:00:00Z"}
            return 200, {}, item
        if method == "POST":
            self.condition = query["ifGenerationMatch"]
            return 200, {"Location": f"{self.stub.url}/upload/storage/v1/b/b/o?upload_id=s1"}, {}
        assert method == "PUT" and query.get("upload_id") == "s1"
        if self.finished:
            self.asked += 1
            return 200, {}, {"name": "k.pt", "size": str(len(self.data))}
        spec, _, total = headers["Content-Range"].removeprefix("bytes ").partition("/")
        if spec != "*":
            start = int(spec.split("-")[0])
            if start != len(self.data):
                return gcs_error(400, f"chunk at {start}, session at {len(self.data)}")
            self.chunks += 1
            keep = body
            if self.fault == "partial" and self.chunks == 2:
                keep = body[: 256 * KiB]  # GCS may persist less than it was sent
            self.data += keep
            if self.fault == "lost" and self.chunks == 2:
                return 0, {}, None  # stored, but the answer never arrives
        if total == "*":
            self.asked += spec == "*"
            return 308, ({"Range": f"bytes=0-{len(self.data) - 1}"} if self.data else {}), b""
        if self.condition != str(self.generation):
            return gcs_error(412, "At least one of the pre-conditions you specified did not hold.")
        assert int(total) == len(self.data)
        self.finished = True
        if self.fault == "lost-finish":
            return 0, {}, None
        return 200, {}, {"name": "k.pt", "size": total}


@pytest.mark.parametrize("fault", ["", "lost", "partial", "lost-finish"])
def test_a_resumable_upload_follows_gcs_session_protocol_through_lost_answers(fault):
    sessions = GCSSessions(fault)
    try:
        store = GCSStore(client(sessions.stub.url), "b", upload="resumable")
        retry = Retry(initial_backoff=0.01)
        upload = store.begin("k.pt", {})
        parts = [bytes([n]) * (512 * KiB) for n in (1, 2, 3)] + [b"tail"]
        for n, data in enumerate(parts, 1):
            retry.call(lambda n=n, data=data: store.put_part(upload, n, memoryview(data)), f"part {n}")
        retry.call(lambda: store.complete(upload, [1, 2, 3, 4], Precondition()), "complete")
        assert sessions.finished and bytes(sessions.data) == b"".join(parts)
        assert sessions.condition == "0"
        assert sessions.asked == (1 if fault.startswith("lost") else 0)  # GCS asked only after a lost answer
        assert sessions.chunks == 4 + (fault == "partial")  # the rest of a partly kept chunk is sent again
    finally:
        sessions.stub.__exit__()


def test_gcs_refusing_the_end_of_a_session_fails_the_save_and_publishes_nothing():
    sessions = GCSSessions(generation=7)
    try:
        store = GCSStore(client(sessions.stub.url), "b", upload="resumable")
        upload = store.begin("k.pt", {})
        assert sessions.condition == "7"  # the generation head saw when the upload began
        store.put_part(upload, 1, memoryview(b"x" * 100))
        sessions.generation = 8  # another writer replaced it meanwhile
        with pytest.raises(ObjectChangedError, match=r"gs://b/k\.pt changed while it was uploaded .* at generation 7"):
            store.complete(upload, [1])  # even without a precondition asked for: never a silent overwrite
        assert not sessions.finished
    finally:
        sessions.stub.__exit__()
