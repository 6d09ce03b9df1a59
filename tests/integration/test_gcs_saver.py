"""GCSSaver against a real fake-gcs-server started by the suite (parallel composite uploads: parts, then compose)."""

from __future__ import annotations

import json
import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint as IgniteCheckpoint

import ckptcloud
from ckptcloud import Checkpoint
from ckptcloud.retry import NO_RETRY
from ckptcloud.savers import GCSSaver
from ckptcloud.stores import gcs
from ckptcloud.stores.gcs import TMP_FOLDER, GCSStore
from tests.helpers import assert_same, dtype_zoo, stored_bytes, training_state
from tests.integration.gcs_stubs import keys, object_bytes

KiB = 1024
MiB = 1024 * KiB
pytestmark = pytest.mark.integration


def spy_composes(monkeypatch) -> list[tuple[str, int]]:
    """Record ``(destination, number of sources)`` of every compose request."""
    calls: list[tuple[str, int]] = []
    original = GCSStore._compose

    def spy(self, name, sources, metadata=None):
        calls.append((name, len(sources)))
        return original(self, name, sources, metadata)

    monkeypatch.setattr(GCSStore, "_compose", spy)
    return calls


@pytest.mark.parametrize(
    "make_state,part_size",
    [
        (training_state, 5 * MiB),  # one put
        (dtype_zoo, 5 * MiB),
        (lambda: {"w": torch.randn(3 * MiB)}, 5 * MiB),  # 12 MiB: three parts, the last one short
        (lambda: {"w": torch.randn(5 * MiB // 4)}, 5 * MiB),  # just over one part after the zip header
        (lambda: {"a": torch.randn(2 * MiB), "b": torch.arange(MiB // 2)}, 256 * KiB),  # 12 MiB: 49 parts
    ],
    ids=["optimizer-scheduler", "dtypes", "12MiB", "one-part-plus", "49-parts"],
)
def test_round_trip_is_bit_identical_and_leaves_no_temporaries(gcs_client, gcs_bucket, make_state, part_size):
    state = make_state()
    saver = GCSSaver(gcs_bucket, "run", client=gcs_client, part_size=part_size, max_concurrency=4)
    saver(state, "ckpt.pt")
    assert object_bytes(gcs_client, gcs_bucket, "run/ckpt.pt") == stored_bytes(state)
    assert_same(state, saver.load("ckpt.pt"))
    assert keys(gcs_client, gcs_bucket) == ["run/ckpt.pt"]


@pytest.mark.parametrize("fan_in,expected_levels", [(32, 2), (3, 4)])
def test_hierarchical_compose_publishes_the_key_only_in_the_last_compose(
    gcs_client, gcs_bucket, monkeypatch, fan_in, expected_levels
):
    monkeypatch.setattr(gcs, "MAX_COMPOSE_SOURCES", fan_in)  # a small fan-in reaches deeper trees with few parts
    composes = spy_composes(monkeypatch)
    state = {"w": torch.randn(10 * MiB // 4)}  # 10 MiB in 256 KiB parts: 41 parts
    saver = GCSSaver(gcs_bucket, "deep", client=gcs_client, part_size=256 * KiB, max_concurrency=8)
    saver(state, "model.pt")
    assert composes[-1][0] == "deep/model.pt"
    assert all(f"deep/{TMP_FOLDER}/" in name for name, _ in composes[:-1])
    assert all(n <= fan_in for _, n in composes)
    assert len({name.rsplit("-", 2)[-2] for name, _ in composes[:-1]}) + 1 == expected_levels
    assert object_bytes(gcs_client, gcs_bucket, "deep/model.pt") == stored_bytes(state)
    assert keys(gcs_client, gcs_bucket) == ["deep/model.pt"]


def test_small_checkpoint_is_one_put_request(gcs_client, gcs_bucket, monkeypatch):
    calls: list[str] = []
    for name in ("put", "begin", "put_part", "complete"):
        original = getattr(GCSStore, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(GCSStore, name, spy)
    GCSSaver(gcs_bucket, client=gcs_client)({"w": torch.ones(10)}, "tiny.pt")
    assert calls == ["put"]
    assert keys(gcs_client, gcs_bucket) == ["tiny.pt"]


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_after_k_parts_publishes_nothing_leaves_no_temporaries_and_keeps_older_checkpoints(
    gcs_client, gcs_bucket, monkeypatch, k, exc
):
    saver = GCSSaver(gcs_bucket, "p", client=gcs_client, part_size=1 * MiB, max_concurrency=2)
    old = {"w": torch.randn(MiB // 2)}  # 2 MiB: composed from parts too
    saver(old, "old.pt")
    saver(old, "same.pt")
    old_bytes = object_bytes(gcs_client, gcs_bucket, "p/same.pt")

    original = GCSStore.put_part

    def flaky(self, upload, number, data):
        if number > k:
            raise exc(f"injected after {k} parts")
        return original(self, upload, number, data)

    monkeypatch.setattr(GCSStore, "put_part", flaky)
    big = {"w": torch.randn(2 * MiB)}  # 8 MiB: 9 parts
    with pytest.raises(exc, match="injected"):
        saver(big, "new.pt")
    with pytest.raises(exc, match="injected"):
        saver(big, "same.pt")  # a failed overwrite keeps the old object
    assert keys(gcs_client, gcs_bucket) == ["p/old.pt", "p/same.pt"]
    assert object_bytes(gcs_client, gcs_bucket, "p/same.pt") == old_bytes
    assert_same(old, saver.load("old.pt"))


def test_failed_final_compose_keeps_the_previous_object_and_leaves_no_temporaries(gcs_client, gcs_bucket, monkeypatch):
    saver = GCSSaver(gcs_bucket, client=gcs_client, part_size=256 * KiB, retry=NO_RETRY)
    old = {"w": torch.randn(MiB)}
    saver(old, "model.pt")
    old_bytes = object_bytes(gcs_client, gcs_bucket, "model.pt")
    original = GCSStore._compose

    def failing_final(self, name, sources, metadata=None):
        if name == "model.pt":
            raise ConnectionError("network down at the final compose")
        return original(self, name, sources, metadata)

    monkeypatch.setattr(GCSStore, "_compose", failing_final)
    with pytest.raises(ConnectionError, match="final compose"):
        saver({"w": torch.randn(3 * MiB)}, "model.pt")  # 12 MiB: 49 parts, intermediates composed first
    assert keys(gcs_client, gcs_bucket) == ["model.pt"]
    assert object_bytes(gcs_client, gcs_bucket, "model.pt") == old_bytes


def test_upload_in_progress_is_invisible_and_abort_removes_every_temporary(gcs_client, gcs_bucket):
    saver = GCSSaver(gcs_bucket, "run", client=gcs_client, part_size=256 * KiB)
    store = saver.store
    upload = store.begin("run/model.pt", {"ckptcloud-priority": "1"})
    for number in (1, 2, 3):
        store.put_part(upload, number, memoryview(bytearray(256 * KiB)))
    assert saver.list() == []
    assert len(store.list(upload.tmp_prefix)) == 3
    store.delete(f"{upload.tmp_prefix}part-00002")  # someone else already removed one
    store.abort(upload)
    store.abort(upload)
    assert keys(gcs_client, gcs_bucket) == []


def test_retention_metadata_is_stored_on_put_and_composed_objects(gcs_client, gcs_bucket):
    saver = GCSSaver(gcs_bucket, client=gcs_client, part_size=256 * KiB)
    ckpt = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver, n_saved=3, score_name="acc")
    ckpt.save(global_step=1, score=0.25)
    ckpt.to_save = {"model": torch.nn.Linear(512, 512)}  # 1 MiB: four parts, composed
    ckpt.save(global_step=2, score=0.5)
    infos = {info.key: info for info in saver.store.list("")}
    assert set(infos) == {"model_1_acc=0.2500.pt", "model_2_acc=0.5000.pt"}
    assert infos["model_1_acc=0.2500.pt"].metadata["ckptcloud_priority"] == "0.25"
    assert infos["model_2_acc=0.5000.pt"].metadata["ckptcloud_priority"] == "0.5"
    assert infos["model_2_acc=0.5000.pt"].metadata["ckptcloud_score_name"] == "acc"
    assert infos["model_2_acc=0.5000.pt"].size > MiB and infos["model_2_acc=0.5000.pt"].last_modified


def test_ranged_reads_match_the_bytes_in_chunks_of_at_most_1_mib(gcs_client, gcs_bucket):
    data = random.Random(0).randbytes(3 * MiB + 17)  # no numpy: the SDK floors stage runs without it
    gcs_client.bucket(gcs_bucket).blob("r.bin").upload_from_string(data)
    store = GCSStore(gcs_client, gcs_bucket)
    assert store.head("r.bin").size == len(data)
    for start, end in [(0, None), (5, 6), (MiB - 1, 2 * MiB + 3), (len(data) - 10, None), (7, 7)]:
        chunks = list(store.read("r.bin", start, end))
        assert all(len(chunk) <= MiB for chunk in chunks)
        assert b"".join(chunks) == data[start:end]


def test_ignite_checkpoint_prunes_through_gcs_saver(gcs_client, gcs_bucket):
    model = torch.nn.Linear(2, 2)
    trainer = Engine(lambda engine, batch: None)
    saver = GCSSaver(gcs_bucket, "ignite", client=gcs_client)
    handler = IgniteCheckpoint({"model": model}, saver, n_saved=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)
    trainer.run([0, 1, 2], max_epochs=5)
    assert keys(gcs_client, gcs_bucket) == ["ignite/model_12.pt", "ignite/model_15.pt"]


def test_checkpoint_url_and_load_objects_url(gcs_endpoint, gcs_client, gcs_bucket, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint.url)  # the default Client() goes to the emulator
    model = torch.nn.Linear(3, 3)
    ckpt = Checkpoint({"model": model}, f"gs://{gcs_bucket}/via-url", n_saved=1)
    ckpt.save(global_step=7)
    assert keys(gcs_client, gcs_bucket) == ["via-url/model_7.pt"]
    fresh = torch.nn.Linear(3, 3)
    Checkpoint.load_objects({"model": fresh}, f"gs://{gcs_bucket}/via-url/model_7.pt")
    assert_same(model.state_dict(), fresh.state_dict())
    saver = ckptcloud.saver_from_url(f"gs://{gcs_bucket}/via-url", require_empty=False)
    assert saver.list() == ["model_7.pt"]


def test_remove_is_idempotent_and_listing_sees_only_the_prefix(gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    for name in ("other/x.pt", "mine-not/y.pt"):
        bucket.blob(name).upload_from_string(b"not ours")
    saver = GCSSaver(gcs_bucket, "mine", client=gcs_client)
    saver({"w": torch.ones(1)}, "a.pt")
    saver({"w": torch.ones(1)}, "b.pt")
    bucket.blob("mine/sub/c.pt").upload_from_string(b"nested, not listed")
    assert saver.list() == ["a.pt", "b.pt"]
    saver.remove("a.pt")
    saver.remove("a.pt")
    assert saver.list() == ["b.pt"]
    assert "other/x.pt" in keys(gcs_client, gcs_bucket)


def test_require_empty_refuses_a_prefix_with_checkpoints(gcs_client, gcs_bucket):
    gcs_client.bucket(gcs_bucket).blob("run/model_1.pt").upload_from_string(b"x")
    with pytest.raises(ValueError, match=r"model_1\.pt.*gs://.*/run/.*require_empty=False"):
        GCSSaver(gcs_bucket, "run", client=gcs_client)
    GCSSaver(gcs_bucket, "run", client=gcs_client, require_empty=False)
    GCSSaver(gcs_bucket, "other-run", client=gcs_client)


def test_missing_bucket_is_named_at_construction(gcs_client):
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        GCSSaver("no-such-bucket-here", client=gcs_client)


def test_missing_key_on_load_names_the_url(gcs_client, gcs_bucket):
    saver = GCSSaver(gcs_bucket, "p", client=gcs_client)
    with pytest.raises(FileNotFoundError, match=f"gs://{gcs_bucket}/p/absent.pt"):
        saver.load("absent.pt")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"part_size": 100 * KiB},
            "`part_size` should be between 262144 and 5368709120 bytes and a multiple of 262144",
        ),
        ({"part_size": 300 * KiB}, "multiple of 262144"),
        ({"part_size": 6 * 1024**3}, "`part_size`"),
        ({"max_concurrency": 0}, "`max_concurrency` should be between 1 and 64, but given 0"),
        ({"bucket": "a/b"}, "`bucket`"),
    ],
)
def test_out_of_range_arguments_are_named(gcs_client, gcs_bucket, kwargs, match):
    kwargs = {"bucket": gcs_bucket, **kwargs}
    with pytest.raises(ValueError, match=match):
        GCSSaver(client=gcs_client, **kwargs)


class _DenyAll(BaseHTTPRequestHandler):
    """Answers every request like GCS does to a caller without rights."""

    def _deny(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.list access"}})
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_DELETE = _deny

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def deny_all_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DenyAll)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_access_denied_and_credentials_never_shown(deny_all_endpoint, gcs_endpoint, gcs_bucket, caplog):
    from google.cloud import storage
    from google.oauth2.credentials import Credentials

    secret = "ya29.SuperSecretToken-do-not-print-0123456789"
    caplog.set_level(logging.DEBUG)

    def client(endpoint: str) -> storage.Client:
        return storage.Client(
            project="test", credentials=Credentials(token=secret), client_options={"api_endpoint": endpoint}
        )

    with pytest.raises(PermissionError) as denied:
        GCSSaver("some-bucket", "p", client=client(deny_all_endpoint))
    store = GCSStore(client(deny_all_endpoint), "some-bucket")
    with pytest.raises(PermissionError) as denied_upload:
        store.put_part(store.begin("p/m.pt", {}), 1, memoryview(b"x"))
    with pytest.raises(FileNotFoundError) as missing:
        GCSSaver("no-such-bucket", client=client(gcs_endpoint.url))
    saver = GCSSaver(gcs_bucket, "p", client=client(gcs_endpoint.url))
    saver({"w": torch.ones(2)}, "m.pt")
    assert "access denied" in str(denied.value) and "some-bucket" in str(denied.value)
    assert "access denied" in str(denied_upload.value)
    shown = [str(e.value) + repr(e.value) for e in (denied, denied_upload, missing)] + [repr(saver), caplog.text]
    for text in shown:
        assert secret not in text
