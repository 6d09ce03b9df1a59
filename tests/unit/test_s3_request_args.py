"""S3 request arguments without a server: ``extra_args`` refused at construction, error codes, batch deletes.

The construction checks need no network (a dead endpoint proves it: the check must come before any request).
The request-level tests use botocore's ``Stubber`` on a real client, which checks every call's parameters against
S3's service model and answers with the responses queued here.
"""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from ckptcloud.errors import TransientError
from ckptcloud.retry import NO_RETRY
from ckptcloud.savers import S3Saver
from ckptcloud.stores.s3 import S3Store
from ckptcloud.testing.servers import free_port

SSE_C_KEY = "0123456789abcdef-SSE-C-test-key!"  # 32 bytes: a valid AES256 key, and a secret


def client():
    return boto3.client(
        "s3", region_name="us-east-1", aws_access_key_id="AKIAUNITTEST", aws_secret_access_key="unit-test-secret"
    )


def test_metadata_in_extra_args_fails_at_construction_not_at_the_first_save():
    """Trial 14: `extra_args={"Metadata": ...}` was accepted and failed hours later with a bare TypeError."""
    dead = f"http://127.0.0.1:{free_port()}"  # the check must not need the endpoint
    with pytest.raises(ValueError, match=r"`extra_args` should not set 'Metadata': ckptcloud stores its own metadata"):
        S3Saver("bkt", "run", endpoint_url=dead, region_name="us-east-1", retry=NO_RETRY,
                extra_args={"Metadata": {"git_sha": "abc123"}})  # fmt: skip


@pytest.mark.parametrize(
    "key", ["Bucket", "Key", "Body", "ContentLength", "ContentMD5", "IfMatch", "IfNoneMatch", "UploadId", "Range"]
)
def test_keys_ckptcloud_sets_itself_are_refused_naming_the_key_and_the_fix(key):
    with pytest.raises(ValueError, match=rf"`extra_args` should not set '{key}'.*Remove '{key}' from `extra_args`"):
        S3Store(client(), "bkt", extra_args={key: "x"})


@pytest.mark.parametrize("key", ["ChecksumAlgorithm", "ChecksumSHA256", "ChecksumType"])
def test_checksum_keys_are_refused_because_every_part_carries_its_crc32c(key):
    with pytest.raises(ValueError, match=rf"`extra_args` should not set checksums.*{key}"):
        S3Store(client(), "bkt", extra_args={key: "SHA256"})


@pytest.mark.parametrize(
    "key,hint",
    [
        ("VersionId", ""),  # a read argument, not an upload argument
        ("WriteOffsetBytes", ""),  # PutObject only: a multipart save would fail
        ("ServerSideEncryptionX", " Did you mean 'ServerSideEncryption'?"),
        ("storageclass", ""),
    ],
)
def test_keys_no_upload_operation_accepts_are_refused_at_construction(key, hint):
    with pytest.raises(ValueError) as info:
        S3Store(client(), "bkt", extra_args={key: "x"})
    message = str(info.value)
    assert "`extra_args`" in message and repr(key) in message and "PutObject and CreateMultipartUpload" in message
    assert message.endswith(hint) or not hint


def test_a_value_of_the_wrong_type_is_refused_without_showing_the_value():
    with pytest.raises(TypeError, match=r"`extra_args` should map 'StorageClass' to a str, but given int"):
        S3Store(client(), "bkt", extra_args={"StorageClass": 3})
    with pytest.raises(TypeError, match=r"'BucketKeyEnabled' to a bool, but given str"):
        S3Store(client(), "bkt", extra_args={"BucketKeyEnabled": "yes"})
    secret = list(SSE_C_KEY)  # a list is the wrong type; its characters must not be echoed
    with pytest.raises(TypeError, match=r"'SSECustomerKey' to a str or bytes, but given list") as info:
        S3Store(client(), "bkt", extra_args={"SSECustomerAlgorithm": "AES256", "SSECustomerKey": secret})
    assert "0123456789abcdef" not in str(info.value) and "'0'" not in str(info.value)


def test_extra_args_must_be_a_mapping():
    with pytest.raises(TypeError, match=r"`extra_args` should be a dict of S3 upload arguments.*given list"):
        S3Store(client(), "bkt", extra_args=[("StorageClass", "STANDARD_IA")])  # type: ignore[arg-type]


def test_upload_arguments_are_accepted():
    store = S3Store(client(), "bkt", extra_args={
        "ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/x", "StorageClass": "STANDARD_IA",
        "RequestPayer": "requester", "ExpectedBucketOwner": "123456789012", "Tagging": "a=b", "ACL": "private",
        "BucketKeyEnabled": True,
    })  # fmt: skip
    assert store.url("k") == "s3://bkt/k"


# ------------------------------------------------------------------------------------------ request-level


def test_batch_delete_sends_1000_keys_per_request_and_skips_missing_keys():
    c = client()
    store = S3Store(c, "bkt", extra_args={"RequestPayer": "requester", "ExpectedBucketOwner": "123456789012"})
    keys = [f"run/{i}.pt" for i in range(1500)]
    with Stubber(c) as stub:
        for batch in (keys[:1000], keys[1000:]):
            expected = {
                "Bucket": "bkt",
                "Delete": {"Objects": [{"Key": k} for k in batch], "Quiet": True},
                "RequestPayer": "requester",
                "ExpectedBucketOwner": "123456789012",
            }
            errors = [{"Key": batch[0], "Code": "NoSuchKey", "Message": "gone"}]
            stub.add_response("delete_objects", {"Errors": errors}, expected)
        store.delete_many(keys)
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    "code,error", [("AccessDenied", PermissionError), ("InternalError", TransientError), ("Weird", OSError)]
)
def test_a_key_the_batch_delete_could_not_delete_raises_a_clear_error_naming_it(code, error):
    c = client()
    store = S3Store(c, "bkt")
    with Stubber(c) as stub:
        stub.add_response("delete_objects", {"Errors": [{"Key": "run/b.pt", "Code": code, "Message": "no"}]})
        with pytest.raises(error, match=rf"S3 did not delete 1 of 2 objects: s3://bkt/run/b\.pt \({code}\)"):
            store.delete_many(["run/a.pt", "run/b.pt"])


def test_every_code_botocore_would_retry_is_retried_by_the_pipeline():
    """ckptcloud's clients send each request once, so the pipeline must treat as transient all that botocore's
    standard mode would have retried: throttling codes, request timeouts, 5xx and 429."""
    from botocore.retries import standard

    codes = [
        *standard.ThrottledRetryableChecker._THROTTLED_ERROR_CODES,
        *standard.TransientRetryableChecker._TRANSIENT_ERROR_CODES,
    ]
    statuses = [*standard.TransientRetryableChecker._TRANSIENT_STATUS_CODES, 429]
    c = client()
    store = S3Store(c, "bkt")
    with Stubber(c) as stub:
        for code in codes:
            stub.add_client_error("head_object", service_error_code=code, http_status_code=400)
        for status in statuses:
            stub.add_client_error("head_object", service_error_code="", http_status_code=status)
        for _ in codes + statuses:
            with pytest.raises(TransientError):
                store.head("run/a.pt")


def test_a_gone_upload_whose_object_cannot_be_read_is_reported_as_gone_not_as_denied():
    """NoSuchUpload from complete, then HEAD denied (no s3:GetObject): the save failed because the upload is gone;
    the message says so, and says why the object could not be checked."""
    from ckptcloud.errors import CkptcloudError

    c = client()
    store = S3Store(c, "bkt")
    parts = [{"PartNumber": 1, "ETag": '"' + "ab" * 16 + '"', "ChecksumCRC32C": "AAAAAA=="}]
    with Stubber(c) as stub:
        stub.add_client_error("complete_multipart_upload", service_error_code="NoSuchUpload", http_status_code=404)
        stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
        with pytest.raises(CkptcloudError, match=r"no longer exists \(NoSuchUpload\).*could not be checked.*denied"):
            store.complete(("run/a.pt", "upload-1"), parts)
