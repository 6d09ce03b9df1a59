"""S3 ``extra_args``: checked once against botocore's service model, then split per operation, as s3transfer does.

A user's ``extra_args`` are upload arguments (what ``PutObject`` and ``CreateMultipartUpload`` both accept). Each
request ckptcloud makes gets the subset its own operation accepts, so SSE-C (``SSECustomerAlgorithm``,
``SSECustomerKey``, ``SSECustomerKeyMD5``) also reaches every part, the complete, every HEAD and GET, and
``RequestPayer``/``ExpectedBucketOwner`` reach every request, listings and deletes included. Keys that ckptcloud
sets itself, and keys that are not upload arguments, are refused here, when the store is made, not at the first
save. Error messages name keys and types, never values (an SSE-C key is a secret).
"""

from __future__ import annotations

import datetime
import difflib
from collections.abc import Mapping
from typing import Any

# Every operation S3Store calls. A request gets the user's keys that its operation's input shape has.
OPERATIONS = (
    "PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload",
    "HeadObject", "GetObject", "DeleteObject", "DeleteObjects", "ListObjectsV2", "ListMultipartUploads", "HeadBucket",
)  # fmt: skip

# Keys ckptcloud sets itself on its requests, and why (the checksum keys get one message of their own).
RESERVED = {
    "Bucket": "the bucket is the saver's `bucket` argument",
    "Key": "object keys come from the saver's prefix and each checkpoint's filename",
    "Body": "ckptcloud sends the checkpoint's bytes itself",
    "ContentLength": "ckptcloud sends the checkpoint's bytes itself",
    "ContentMD5": "every part and put already carries its CRC32C",
    "Metadata": (
        "ckptcloud stores its own metadata with each checkpoint (priority, score name, basename, run id) and sets "
        "this field itself; keep run information (e.g. a git SHA) in the checkpoint dict instead"
    ),
    "IfMatch": "ckptcloud makes its own conditional writes (a save never overwrites another run's object unseen)",
    "IfNoneMatch": "ckptcloud makes its own conditional writes (a save never overwrites another run's object unseen)",
    "UploadId": "ckptcloud manages its multipart uploads itself",
    "PartNumber": "ckptcloud manages its multipart uploads itself",
    "MultipartUpload": "ckptcloud manages its multipart uploads itself",
    "Range": "ckptcloud downloads in ranges itself",
}
EXAMPLES = (
    "ServerSideEncryption, SSEKMSKeyId, SSECustomerAlgorithm/SSECustomerKey, StorageClass, RequestPayer, "
    "ExpectedBucketOwner, ACL, Tagging, ContentType"
)
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "long": (int,),
    "timestamp": (datetime.datetime, str, int, float),
    "map": (Mapping,),
}


def _refuse(key: str, reason: str) -> ValueError:
    return ValueError(f"Argument `extra_args` should not set {key!r}: {reason}. Remove {key!r} from `extra_args`.")


def split_extra_args(service_model: Any, extra_args: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{operation: the keys of extra_args its input accepts}`` for each of :data:`OPERATIONS`.

    Args:
        service_model: botocore's S3 service model (``client.meta.service_model``).
        extra_args: upload arguments, as for boto3's ``upload_fileobj(ExtraArgs=...)``.

    Raises:
        TypeError: ``extra_args`` is not a mapping with string keys, or a value has the wrong type.
        ValueError: a key ckptcloud sets itself, or a key that ``PutObject`` and ``CreateMultipartUpload`` do not
            both accept (every checkpoint is written by one or the other, depending on its size).
    """
    if extra_args is None:
        extra_args = {}
    if not isinstance(extra_args, Mapping) or not all(isinstance(k, str) for k in extra_args):
        raise TypeError(
            f"Argument `extra_args` should be a dict of S3 upload arguments with str keys, but given "
            f"{type(extra_args).__name__}"
            + ("" if not isinstance(extra_args, Mapping) else f" with keys {sorted(map(repr, extra_args))}")
        )
    checksums = sorted(k for k in extra_args if k.startswith("Checksum"))
    if checksums:
        raise ValueError(
            "Argument `extra_args` should not set checksums: every part already carries its CRC32C, "
            f"but given {checksums}. Remove them from `extra_args`."
        )
    for key in extra_args:
        if key in RESERVED:
            raise _refuse(key, RESERVED[key])
    if not extra_args:
        return {op: {} for op in OPERATIONS}
    put = service_model.operation_model("PutObject").input_shape.members
    create = service_model.operation_model("CreateMultipartUpload").input_shape.members
    for key, value in extra_args.items():
        if key not in put or key not in create:
            close = difflib.get_close_matches(key, [k for k in put if k in create and k not in RESERVED], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Argument `extra_args` should hold upload arguments that both PutObject and CreateMultipartUpload "
                f"accept (e.g. {EXAMPLES}), but given {key!r}.{hint}"
            )
        expected = (str, bytes) if key == "SSECustomerKey" else _TYPES.get(put[key].type_name)
        if expected is None:
            continue
        wrong = not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)
        if wrong:  # the type only: a value can be a secret (SSECustomerKey)
            names = " or ".join(t.__name__ for t in expected)
            raise TypeError(f"Argument `extra_args` should map {key!r} to a {names}, but given {type(value).__name__}")
    out = {}
    for op in OPERATIONS:
        members = service_model.operation_model(op).input_shape.members
        out[op] = {k: v for k, v in extra_args.items() if k in members}
    return out
