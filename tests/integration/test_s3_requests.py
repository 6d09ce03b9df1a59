"""What S3Store sends, and how long it waits, against real servers.

moto_server records what every request carries (through botocore's ``before-send`` event: the real headers);
SeaweedFS enforces SSE-C, so an SSE-C checkpoint round trip runs there, and it answers ``NoSuchUpload`` to a
complete of an aborted upload. A socket that accepts connections and never answers stands for a hung endpoint.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import torch
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from ckptcloud.errors import CkptcloudError, TransientError
from ckptcloud.retry import Retry
from ckptcloud.savers import S3Saver
from ckptcloud.stores.s3 import S3Store, make_s3_client
from ckptcloud.testing.faultproxy import FaultProxy
from tests.helpers import assert_same

MiB = 1024 * 1024
pytestmark = pytest.mark.integration
SSE_C = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "ckptcloud-test-SSE-C-key-32-byte"}
PAYER = {"RequestPayer": "requester", "ExpectedBucketOwner": "123456789012"}  # moto's default account
SSE_C_HEADERS = {
    "x-amz-server-side-encryption-customer-algorithm",
    "x-amz-server-side-encryption-customer-key",
    "x-amz-server-side-encryption-customer-key-md5",
}
# What each operation must carry (from the S3 API reference): SSE-C on every request that reads or writes the
# object's bytes; the payer and the bucket owner on every request (HeadBucket takes no RequestPayer).
PAYER_HEADERS = frozenset({"x-amz-request-payer", "x-amz-expected-bucket-owner"})
_WITH_SSE_C = ["PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "HeadObject", "GetObject"]
_WITHOUT = ["AbortMultipartUpload", "DeleteObject", "DeleteObjects", "ListObjectsV2", "ListMultipartUploads"]
EXPECTED = {
    **dict.fromkeys(_WITH_SSE_C, frozenset(SSE_C_HEADERS | PAYER_HEADERS)),
    **dict.fromkeys(_WITHOUT, PAYER_HEADERS),
    "HeadBucket": frozenset({"x-amz-expected-bucket-owner"}),
}


def plain_client(endpoint: str):
    config = Config(retries={"mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def test_sse_c_requester_pays_and_bucket_owner_reach_every_request(s3_endpoint, s3_bucket):
    """Review 18: extra_args reached only put and create; SSE-C parts, HEADs and GETs then fail on AWS."""
    client = plain_client(s3_endpoint.url)  # one client: every request the store makes goes through it
    sent: list[tuple[str, set[str]]] = []

    def record(request, event_name, **_):
        sent.append((event_name.rsplit(".", 1)[-1], {h.lower() for h in request.headers}))

    client.meta.events.register("before-send.s3", record)
    saver = S3Saver(s3_bucket, "run", client=client, part_size=5 * MiB, extra_args={**SSE_C, **PAYER})
    state = {"w": torch.randn(3 * MiB)}  # 12 MiB: three parts
    saver(state, "big.pt")
    saver({"w": torch.ones(3)}, "small.pt")  # one put
    assert_same(state, saver.load("big.pt"))
    assert set(saver.describe()) == {"big.pt", "small.pt"}
    saver.remove("small.pt")
    saver.store.delete_many(["run/big.pt", "run/absent.pt"])
    saver.store.begin("run/left.pt", {})
    assert saver.cleanup_incomplete(older_than=0) == ["run/left.pt"]

    missing = [(op, sorted(EXPECTED[op] - headers)) for op, headers in sent if EXPECTED[op] - headers]
    assert missing == []
    assert {op for op, _ in sent} == set(EXPECTED), "some operation was not exercised: the test would be vacuous"


def test_an_sse_c_checkpoint_round_trips_on_a_server_that_enforces_sse_c(large_s3_bucket):
    """SeaweedFS refuses a GET or HEAD of an SSE-C object without its key, and cannot read back an object whose
    parts were sent without it: a multipart save and load only work if every request carries the key."""
    from botocore.exceptions import ClientError

    bucket, client = large_s3_bucket
    saver = S3Saver(bucket, "enc", client=client, part_size=5 * MiB, extra_args=SSE_C)
    state = {"w": torch.randn(3 * MiB), "step": 7}  # 12 MiB: a multipart upload
    saver(state, "ckpt.pt")
    assert_same(state, saver.load("ckpt.pt"))
    assert saver.describe()["ckpt.pt"].size > 12 * MiB  # HEAD with the key
    with pytest.raises(ClientError, match="InvalidArgument"):
        client.get_object(Bucket=bucket, Key="enc/ckpt.pt")  # the object is encrypted with the key
    with pytest.raises(Exception):  # noqa: B017 (a saver without the key cannot read it, whatever the error)
        S3Saver(bucket, "enc", client=client, require_empty=False, retry=Retry(max_attempts=1)).load("ckpt.pt")


class _Raw:
    """The body of a synthetic botocore response."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_):
        yield self.body


def test_a_complete_whose_answer_was_lost_and_whose_repeat_answers_no_such_upload_is_saved(s3_endpoint, s3_bucket):
    """Review 28: the first CompleteMultipartUpload succeeds on the server but its answer is cut off; some servers
    (Alibaba OSS documents it) answer the retried complete with NoSuchUpload. The object is there, with the ETag
    the parts make, so the save succeeded. The proxy cuts the real answer; the repeat is answered as such a server
    would (moto itself repeats the success)."""
    completes = []
    with FaultProxy(upstream_port=int(s3_endpoint.url.rsplit(":", 1)[1])) as proxy:

        def on_request(number, method, target):
            if method == "POST" and "uploadId=" in target:
                proxy.clear_faults()  # this complete was drawn with reset_mid; the next requests are clean

        proxy.on_request = on_request
        client = make_s3_client(endpoint_url=proxy.endpoint, region_name="us-east-1")

        def complete(request, **_):
            completes.append(request.url)
            if len(completes) == 1:
                proxy.set_rates(reset_mid=1.0)  # the server completes; its answer is cut mid-way
                return None
            body = b"<Error><Code>NoSuchUpload</Code><Message>The upload may have been completed.</Message></Error>"
            return AWSResponse(request.url, 404, {"Content-Type": "application/xml"}, _Raw(body))

        client.meta.events.register("before-send.s3.CompleteMultipartUpload", complete)
        saver = S3Saver(s3_bucket, "run", client=client, part_size=5 * MiB, retry=Retry(initial_backoff=0.01))
        state = {"w": torch.randn(3 * MiB)}
        saver(state, "ckpt.pt")
        assert proxy.counters["reset_mid"] == 1 and len(completes) == 2
        assert_same(state, saver.load("ckpt.pt"))


def test_a_complete_of_an_upload_that_is_gone_fails_clearly_instead_of_publishing(large_s3_bucket):
    """NoSuchUpload from complete with no object at the key, or another object there, is a failed save, said
    plainly (the upload was aborted or expired), never mistaken for success. SeaweedFS answers NoSuchUpload."""
    bucket, client = large_s3_bucket
    store = S3Store(client, bucket)
    upload = store.begin("run/a.pt", {})
    part = store.put_part(upload, 1, memoryview(b"x" * 1000))
    store.abort(upload)
    with pytest.raises(CkptcloudError, match=r"upload to s3://.*/run/a\.pt no longer exists.*no object is there"):
        store.complete(upload, [part])

    client.put_object(Bucket=bucket, Key="run/a.pt", Body=b"another writer's object")
    upload = store.begin("run/a.pt", {})
    part = store.put_part(upload, 1, memoryview(b"y" * 1000))
    store.abort(upload)
    with pytest.raises(CkptcloudError, match=r"no longer exists.*the object there has ETag .*aborted"):
        store.complete(upload, [part])
    assert client.get_object(Bucket=bucket, Key="run/a.pt")["Body"].read() == b"another writer's object"


def test_deleting_2500_keys_takes_three_batch_requests(s3_client, s3_bucket):
    """Trial 15: prune and resume deleted one request per key. DeleteObjects takes 1,000 keys per request."""
    keys = [f"run/model_{i}.pt" for i in range(2400)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3_client.put_object(Bucket=s3_bucket, Key=k, Body=b"x"), keys))
    store = S3Store(s3_client, s3_bucket)
    calls: list[str] = []
    for client in {id(c): c for c in (store.client, getattr(store, "metadata_client", store.client))}.values():
        client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    store.delete_many(keys + [f"run/absent_{i}.pt" for i in range(100)])  # 2,500 keys, 100 already gone
    assert calls == ["DeleteObjects"] * 3
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


# ------------------------------------------------------------------------------------------ a hung endpoint


@pytest.fixture
def hung_endpoint():
    """A port that accepts TCP connections and never answers; yields (url, accepted connections)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def test_a_hung_endpoint_fails_the_constructor_within_attempts_times_the_metadata_timeout(
    hung_endpoint, monkeypatch, caplog
):
    """Trial 12: S3Saver(...) blocked 488 s in silence (botocore's 4 requests x 120 s inside one attempt). Now
    each pipeline attempt is one request, metadata requests time out sooner, and each retry logs a warning."""
    from ckptcloud.stores import s3_client

    timeout, attempts = 0.4, 3
    monkeypatch.setattr(s3_client, "METADATA_READ_TIMEOUT", timeout)
    url, accepted = hung_endpoint
    outcome: list[BaseException] = []
    retry = Retry(max_attempts=attempts, initial_backoff=0.01, max_backoff=0.02)

    def construct() -> None:
        try:
            S3Saver("bkt", "run", endpoint_url=url, region_name="us-east-1", retry=retry)
        except BaseException as err:
            outcome.append(err)

    caplog.set_level(logging.INFO, logger="ckptcloud")
    start = time.monotonic()
    thread = threading.Thread(target=construct, daemon=True)
    thread.start()
    thread.join(attempts * timeout + 3.0)
    elapsed = time.monotonic() - start
    assert not thread.is_alive(), f"S3Saver(...) still blocked after {elapsed:.1f} s"
    assert elapsed < attempts * timeout + 2.0
    assert len(accepted) == attempts  # one request per pipeline attempt: no hidden SDK retries
    [err] = outcome
    assert isinstance(err, TransientError)
    assert str(err) == f"no answer from {url} within {timeout:g} s (checking the bucket s3://bkt)"
    retries = [r for r in caplog.records if r.name == "ckptcloud" and r.levelno >= logging.INFO]
    assert len(retries) == attempts - 1 and all(url in r.getMessage() for r in retries)
    assert retries[0].created - (time.time() - elapsed) < timeout + 1.0  # the first warning: one timeout in


def test_metadata_requests_wait_less_than_data_requests():
    from ckptcloud.stores import s3_client

    client = make_s3_client(region_name="us-east-1")
    store = S3Store(client, "bkt")
    assert client.meta.config.read_timeout == s3_client.DATA_READ_TIMEOUT == 120
    assert store.metadata_client.meta.config.read_timeout == s3_client.METADATA_READ_TIMEOUT < 120
    assert client.meta.config.retries["total_max_attempts"] == 1  # the pipeline's Retry bounds the whole call
