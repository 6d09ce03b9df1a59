"""GCS failures say what failed and where, within bounded time, never showing a credential; encryption keys reach
every request that needs them. Against fake-gcs-server wherever it can express the case, else a loopback stub that
answers like GCS documents (see ``gcs_stubs``)."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import traceback
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import torch

from ckptcloud.errors import TransientError
from ckptcloud.retry import NO_RETRY, Retry
from ckptcloud.savers import GCSSaver
from ckptcloud.stores import gcs
from ckptcloud.stores.gcs import GCSStore
from ckptcloud.testing.faultproxy import FaultProxy
from tests.helpers import assert_same, stored_bytes
from tests.integration.gcs_stubs import SilentEndpoint, client, gcs_error, recording_client, stub_fixture

KiB = 1024
pytestmark = pytest.mark.integration
TOKEN = "ya29.SECRET-bearer-token-do-not-show-0123456789"
KEY = hashlib.sha256(b"ckptcloud test key").digest()  # 32 bytes
KEY_B64 = base64.b64encode(KEY).decode()
KMS = "projects/p/locations/us/keyRings/ring/cryptoKeys/ckpt"


@pytest.fixture
def stub():
    yield from stub_fixture()


def keys(gcs_client, bucket: str) -> list[str]:
    return sorted(blob.name for blob in gcs_client.list_blobs(bucket))


# ------------------------------------------------------------------------------ 404s say what is missing (review 24)
def test_parts_deleted_under_a_running_upload_are_named_as_such_not_as_a_missing_bucket(gcs_client, gcs_bucket):
    store = GCSSaver(gcs_bucket, "run", client=gcs_client, part_size=256 * KiB, retry=NO_RETRY).store
    upload = store.begin("run/model.pt", {})
    parts = [store.put_part(upload, n, memoryview(bytearray(256 * KiB))) for n in (1, 2, 3)]
    other_process = GCSSaver(gcs_bucket, "run", client=gcs_client, require_empty=False)
    assert other_process.cleanup_incomplete(older_than=0) == [upload.tmp_prefix]  # too eager: this one is running
    with pytest.raises(FileNotFoundError) as info:
        store.complete(upload, parts)
    message = str(info.value)
    assert f"cannot publish gs://{gcs_bucket}/run/model.pt" in message
    assert f"gs://{gcs_bucket}/{upload.tmp_prefix}" in message and "were deleted while the upload ran" in message
    assert "cleanup_incomplete(older_than=...)" in message and "lifecycle rule" in message
    assert "does not exist" not in message
    assert keys(gcs_client, gcs_bucket) == []


def test_a_save_whose_parts_vanish_fails_at_once_without_retrying_the_compose(gcs_client, gcs_bucket, monkeypatch):
    saver = GCSSaver(gcs_bucket, "run", client=gcs_client, part_size=256 * KiB, retry=Retry(initial_backoff=0.01))
    cleaner = GCSSaver(gcs_bucket, "run", client=gcs_client, require_empty=False)
    composes: list[str] = []
    original = GCSStore._compose

    def compose_after_a_cleanup(self, name, sources, metadata=None, **conditions):
        composes.append(name)
        cleaner.cleanup_incomplete(older_than=0)  # another process, just before this compose
        return original(self, name, sources, metadata, **conditions)

    monkeypatch.setattr(GCSStore, "_compose", compose_after_a_cleanup)
    with pytest.raises(FileNotFoundError, match=r"run/model\.pt: \d+ of its temporary parts"):
        saver({"w": torch.randn(KiB * 100)}, "model.pt")
    assert composes == ["run/model.pt"]  # not retried as a server error (fake-gcs-server answers 500)
    assert keys(gcs_client, gcs_bucket) == []


@pytest.mark.parametrize(
    "gcs_says,expected",
    [
        ("No such object: b/run/.ckptcloud-tmp/u/part-00002", "part-00002"),
        ("The specified bucket does not exist.", "GCS bucket 'b' does not exist"),
    ],
    ids=["source-gone", "bucket-gone"],
)
def test_a_compose_404_is_attributed_to_what_gcs_says_is_missing(stub, gcs_says, expected):
    listed = {"items": [{"name": "run/.ckptcloud-tmp/u/part-00001", "size": "1", "updated": "2026-12-01T00:00:00Z"}]}

    def route(method, path, query, headers, body):
        if path.endswith("/compose"):
            return gcs_error(404, gcs_says)
        if method == "GET" and path == "/storage/v1/b/b/o":  # the listing of the temporary folder
            return (200, {}, listed) if "bucket" not in gcs_says else gcs_error(404, gcs_says)
        return 200, {}, {"name": query.get("name", "x")}

    store = GCSStore(client(stub(route).url), "b")
    upload = gcs.GCSUpload("run/model.pt", "run/.ckptcloud-tmp/u/", {})
    with pytest.raises(FileNotFoundError) as info:
        store.complete(upload, [f"{upload.tmp_prefix}part-00001", f"{upload.tmp_prefix}part-00002"])
    assert expected in str(info.value)
    if "bucket" not in gcs_says:
        assert "does not exist" not in str(info.value) and "gs://b/run/model.pt" in str(info.value)


def test_a_missing_object_and_a_missing_bucket_are_told_apart(gcs_client, gcs_bucket):
    saver = GCSSaver(gcs_bucket, "p", client=gcs_client)
    with pytest.raises(FileNotFoundError, match=f"no object at gs://{gcs_bucket}/p/absent.pt"):
        saver.load("absent.pt")
    store = saver.store
    upload = store.begin("p/m.pt", {})
    gcs_client.bucket(gcs_bucket).delete()
    try:
        with pytest.raises(FileNotFoundError, match=f"GCS bucket '{gcs_bucket}' does not exist .uploading part 1"):
            store.put_part(upload, 1, memoryview(b"x"))
    finally:
        gcs_client.create_bucket(gcs_bucket)  # for the fixture's teardown


# ------------------------------------------------------------------------- a silent endpoint is bounded (trial 12)
def test_an_endpoint_that_never_answers_fails_the_constructor_in_bounded_time_naming_it(monkeypatch, caplog):
    monkeypatch.setattr(gcs, "METADATA_READ_TIMEOUT", 0.3)
    caplog.set_level(logging.INFO, logger="ckptcloud")
    with SilentEndpoint() as silent:
        start = time.monotonic()
        with pytest.raises(TransientError) as info:
            GCSSaver("b", "run", client=client(silent.url), retry=Retry(max_attempts=3, initial_backoff=0.01))
        took = time.monotonic() - start
        connections = len(silent.held)
    assert str(info.value) == f"no answer from {silent.url} within 0.3 s (checking the bucket gs://b)"
    assert connections == 3  # one per pipeline attempt: the SDK retries nothing on its own
    assert took < 3
    retries = [r.getMessage() for r in caplog.records if r.name == "ckptcloud" and r.levelno >= logging.INFO]
    assert len(retries) == 2 and all("retrying" in m and silent.url in m for m in retries)


def test_the_default_client_on_a_silent_emulator_host_is_bounded_too(monkeypatch):
    monkeypatch.setattr(gcs, "METADATA_READ_TIMEOUT", 0.2)
    with SilentEndpoint() as silent:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", silent.url)
        with pytest.raises(TransientError, match=f"no answer from {silent.url} within 0.2 s .checking the bucket"):
            GCSSaver("b", project="test", retry=NO_RETRY)
        assert len(silent.held) == 1


def test_data_transfers_keep_a_longer_read_timeout_than_metadata_requests(monkeypatch):
    monkeypatch.setattr(gcs, "METADATA_READ_TIMEOUT", 0.2)
    monkeypatch.setattr(gcs, "DATA_READ_TIMEOUT", 0.6)
    with SilentEndpoint() as silent:
        store = GCSStore(client(silent.url), "b")
        start = time.monotonic()
        with pytest.raises(TransientError, match=r"within 0\.6 s \(uploading part 1 of gs://b/k\.pt\)"):
            store.put_part(store.begin("k.pt", {}), 1, memoryview(b"x"))
        assert 0.5 < time.monotonic() - start < 2
        with pytest.raises(TransientError, match=r"within 0\.6 s \(downloading gs://b/k\.pt\)"):
            list(store.read("k.pt"))
        for request, doing in [
            (lambda: store.head("k.pt"), "reading the metadata of gs://b/k.pt"),
            (lambda: store.list("run/"), "listing gs://b/run/"),
            (lambda: store.delete("k.pt"), "deleting gs://b/k.pt"),
        ]:
            with pytest.raises(TransientError, match=rf"within 0\.2 s \({doing}\)"):
                request()


# ---------------------------------------------------------------------------------------- encryption keys
def _kind(method: str, url: str) -> str:
    path = urlsplit(url).path
    if "upload_id=" in url:
        return "session"
    if path.startswith("/upload/"):
        return "upload"
    if path.endswith("/compose"):
        return "compose"
    if path.startswith("/download/"):
        return "download"
    return "metadata"


@pytest.mark.parametrize("upload", ["composite", "resumable"])
def test_a_customer_supplied_key_reaches_every_upload_compose_and_read(gcs_endpoint, gcs_bucket, monkeypatch, upload):
    monkeypatch.setattr(gcs, "MAX_COMPOSE_SOURCES", 4)  # intermediates too
    recording, recorder = recording_client(gcs_endpoint.url)
    saver = GCSSaver(gcs_bucket, "enc", client=recording, upload=upload, encryption_key=KEY, part_size=256 * KiB)
    small, big = {"w": torch.ones(4)}, {"w": torch.randn(640 * KiB)}  # one put; 2.5 MiB in 11 parts
    saver(small, "small.pt", metadata={"run": "r1"})
    saver(big, "big.pt", metadata={"run": "r1"})
    saver(big, "big.pt", metadata={"run": "r1"})  # replaces its own object: head, then a conditional commit
    assert_same(big, saver.load("big.pt"))
    assert_same(small, saver.load("small.pt"))
    expected = {
        "x-goog-encryption-algorithm": "AES256",
        "x-goog-encryption-key": KEY_B64,
        "x-goog-encryption-key-sha256": base64.b64encode(hashlib.sha256(KEY).digest()).decode(),
    }
    kinds = {"upload", "download"} | ({"compose"} if upload == "composite" else {"session"})
    by_kind: dict[str, int] = {}
    for method, url, headers in recorder.sent:
        kind = _kind(method, url)
        by_kind[kind] = by_kind.get(kind, 0) + 1
        lowered = {name.lower(): value for name, value in headers.items()}
        if kind in kinds:
            assert {name: lowered.get(name) for name in expected} == expected, (method, url)
        else:  # metadata reads, listings and deletes need no key (GCS encrypts metadata with its own keys)
            assert "x-goog-encryption-key" not in lowered, (method, url)
    assert kinds <= set(by_kind), by_kind
    assert KEY_B64 not in repr(saver) + repr(saver.store)


@pytest.mark.parametrize("upload", ["composite", "resumable"])
def test_a_kms_key_name_reaches_every_upload_compose_and_session(gcs_endpoint, gcs_bucket, monkeypatch, upload):
    monkeypatch.setattr(gcs, "MAX_COMPOSE_SOURCES", 4)
    recording, recorder = recording_client(gcs_endpoint.url)
    saver = GCSSaver(gcs_bucket, "kms", client=recording, upload=upload, kms_key_name=KMS, part_size=256 * KiB)
    saver({"w": torch.ones(4)}, "small.pt")
    state = {"w": torch.randn(640 * KiB)}
    saver(state, "big.pt")
    assert_same(state, saver.load("big.pt"))
    writes = [(m, u) for m, u, _ in recorder.sent if _kind(m, u) in ("upload", "compose")]
    assert len(writes) >= (12 if upload == "composite" else 2)
    for method, url in writes:
        assert parse_qs(urlsplit(url).query).get("kmsKeyName") == [KMS], (method, url)
    assert KMS in repr(saver.store)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"encryption_key": b"short"}, "`encryption_key` should be 32 bytes .* given a bytes of length 5"),
        ({"encryption_key": KEY_B64}, "`encryption_key` should be 32 bytes .*b64decode.* given a str of length 44"),
        ({"encryption_key": KEY, "kms_key_name": KMS}, "either `kms_key_name` or `encryption_key`, not both"),
        ({"kms_key_name": "ckpt-key"}, "`kms_key_name` should be a Cloud KMS key name .* given 'ckpt-key'"),
        ({"upload": "xml"}, "`upload` should be 'composite' or 'resumable', but given 'xml'"),
    ],
)
def test_bad_encryption_and_upload_arguments_are_named_never_showing_the_key(gcs_endpoint, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        GCSSaver("b", client=client(gcs_endpoint.url), **kwargs)
    assert KEY_B64 not in str(info.value) and "short" not in str(info.value)


def test_a_customer_supplied_key_is_never_sent_over_http_off_this_machine():
    with pytest.raises(ValueError, match=r"needs an https:// endpoint, but the client's is http://storage\.example:80"):
        GCSStore(client("http://storage.example:80"), "b", encryption_key=KEY)


# ------------------------------------------------------------------------------------- no credential shown
def _texts(err: BaseException) -> list[str]:
    return ["".join(traceback.format_exception(type(err), err, err.__traceback__)), str(err), repr(err)]


def test_no_failure_shows_the_bearer_token_the_encryption_key_or_a_session_url(gcs_endpoint, gcs_bucket, stub, caplog):
    from google.oauth2.credentials import Credentials

    caplog.set_level(logging.DEBUG)
    session_id = "SESSION-id-that-authorizes-uploads-0123456789"
    credentials = Credentials(token=TOKEN)

    def echo(status: int):  # a server (or proxy) that echoes the request's headers in its error message
        def route(method, path, query, headers, body):
            if method == "POST" and query.get("uploadType") == "resumable":
                return 200, {"Location": f"{stub_url[0]}/upload/storage/v1/b/b/o?upload_id={session_id}"}, {}
            if method == "GET" and path.startswith("/storage/v1/b/b/o/"):
                return gcs_error(404, "No such object: b/k.pt")
            if status == 0:
                return 0, {}, None  # the connection drops without an answer
            return gcs_error(status, f"refused {method} {path}?{urlencode(query)}; your request had {headers}")

        return route

    stub_url = [""]
    failures: list[BaseException] = []

    def attempt(fn) -> None:
        try:
            fn()
        except Exception as err:
            failures.append(err)
        else:
            raise AssertionError("expected a failure")

    with FaultProxy(gcs_endpoint.server.port if gcs_endpoint.server else 0, error=1.0) as proxy:
        emulator, broken = client(gcs_endpoint.url, credentials), client(proxy.endpoint, credentials)
        attempt(lambda: GCSSaver(gcs_bucket, client=client("http://127.0.0.1:9", credentials), retry=NO_RETRY))
        attempt(lambda: GCSSaver("no-such-bucket", client=emulator, retry=NO_RETRY))
        attempt(lambda: GCSSaver(gcs_bucket, client=emulator, encryption_key=KEY).load("absent.pt"))
        attempt(lambda: GCSSaver(gcs_bucket, client=broken, retry=NO_RETRY))  # 503 from the proxy
        for status in (403, 500, 0):
            server = stub(echo(status))
            stub_url[0] = server.url
            for upload in ("composite", "resumable"):
                store = GCSStore(client(server.url, credentials), "b", upload=upload, encryption_key=KEY)
                attempt(store.check_bucket)
                attempt(lambda s=store: s.put("k.pt", memoryview(b"x"), {}))
                attempt(lambda s=store: s.put_part(s.begin("k.pt", {}), 1, memoryview(bytearray(256 * KiB))))
                attempt(lambda s=store: list(s.read("k.pt")))
    assert len(failures) == 4 + 3 * 2 * 4
    assert {type(f).__name__ for f in failures} >= {"PermissionError", "FileNotFoundError", "TransientError"}
    assert any("REDACTED" in str(f) for f in failures)  # the echoed headers were there, and were redacted
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("ckptcloud"))
    secrets = [TOKEN[:16], KEY_B64[:10], session_id[:16]]  # not even a part of one
    for text in [t for f in failures for t in _texts(f)] + [ours]:
        assert not [secret for secret in secrets if secret in text], text
    assert TOKEN[:16] not in caplog.text and KEY_B64[:10] not in caplog.text  # no logger at all shows them


def test_round_trip_with_a_bearer_token_client_is_bit_identical(gcs_endpoint, gcs_bucket):
    from google.oauth2.credentials import Credentials

    state = {"w": torch.randn(300 * KiB)}
    saver = GCSSaver(gcs_bucket, "tok", client=client(gcs_endpoint.url, Credentials(token=TOKEN)), part_size=256 * KiB)
    saver(state, "m.pt")
    assert saver.store.head("tok/m.pt").size == len(stored_bytes(state))
    assert_same(state, saver.load("m.pt"))
