"""The GCS store's options, checked: how it uploads and which key encrypts what it writes."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from ckptcloud.stores import gcs_http as ops

UPLOADS = ("composite", "resumable")
_KMS_KEY = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+")


@dataclass(frozen=True)
class Encryption:
    """What each request carries: ``kmsKeyName`` (query) for writes, or the CSEK headers for writes and reads."""

    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    secret: str = field(default="", repr=False)  # the key as it appears in a header, to redact

    def describe(self) -> str:
        """For reprs: never the key."""
        return "customer-supplied key" if self.headers else self.params.get("kmsKeyName", "GCS default")


def check_options(client: Any, upload: str, kms_key_name: Any, encryption_key: Any) -> Encryption:
    """Raise ``ValueError`` naming the argument (never the key's value); return what the requests carry."""
    if upload not in UPLOADS:
        raise ValueError(f"Argument `upload` should be 'composite' or 'resumable', but given {upload!r}")
    if kms_key_name is not None and (not isinstance(kms_key_name, str) or not _KMS_KEY.fullmatch(kms_key_name)):
        raise ValueError(
            "Argument `kms_key_name` should be a Cloud KMS key name "
            f"'projects/P/locations/L/keyRings/R/cryptoKeys/K', but given {kms_key_name!r}"
        )
    if encryption_key is None:
        return Encryption(params={"kmsKeyName": kms_key_name} if kms_key_name else {})
    if not isinstance(encryption_key, (bytes, bytearray)) or len(encryption_key) != 32:
        length = f" of length {len(encryption_key)}" if hasattr(encryption_key, "__len__") else ""
        raise ValueError(  # never the value: it is a secret
            "Argument `encryption_key` should be 32 bytes (an AES-256 key; base64.b64decode a base64 one), "
            f"but given a {type(encryption_key).__name__}{length}"
        )
    if kms_key_name is not None:
        raise ValueError("Pass either `kms_key_name` or `encryption_key`, not both: GCS uses one key per object")
    base = str(client._connection.get_api_base_url_for_mtls())
    if not base.startswith("https://") and not ops.is_loopback(base):
        raise ValueError(
            f"Argument `encryption_key` needs an https:// endpoint, but the client's is {ops.endpoint_of(base)}: "
            "the key would cross the network in clear text"
        )
    key = bytes(encryption_key)
    return Encryption(headers=ops.encryption_headers(key), secret=base64.b64encode(key).decode())
