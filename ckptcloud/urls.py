"""URLs to savers: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix``, ``file:///dir``.

Cloud SDKs are imported only when a URL of their scheme is used; a missing one says which extra to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ckptcloud import serialization
from ckptcloud.handlers import DiskSaver, check_filename

# scheme -> (module, saver class, pip extra, SDK module that must be importable)
_SCHEMES: dict[str, tuple[str, str, str, str]] = {
    "s3": ("ckptcloud.savers", "S3Saver", "s3", "boto3"),
    "gs": ("ckptcloud.savers", "GCSSaver", "gcs", "google.cloud.storage"),
    "az": ("ckptcloud.savers", "AzureBlobSaver", "azure", "azure.storage.blob"),
}


def split_url(url: str) -> tuple[str, str, str]:
    """Split ``scheme://bucket/some/prefix`` into ``(scheme, bucket, "some/prefix")``; the key part is kept
    verbatim (``#`` and ``?`` included) for cloud URLs, and percent-decoded for ``file://``.

    Example:
        >>> split_url("s3://bkt/runs/exp#1?lr=0.1")
        ('s3', 'bkt', 'runs/exp#1?lr=0.1')

    Raises:
        ValueError: no scheme, an unknown scheme, or no bucket.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"Argument `url` should look like 's3://bucket/prefix', but given {url!r}")
    # Split by hand: '#' and '?' are legal in object keys, and urlsplit would drop what follows them.
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    netloc, slash, path = rest.partition("/")
    if scheme == "file":
        if netloc not in ("", "localhost") or not slash:
            raise ValueError(f"file:// URLs need an absolute path, e.g. 'file:///abs/dir', but given {url!r}")
        return scheme, "", unquote("/" + path)  # Path.as_uri() percent-encodes; a raw '#' or '?' stays as is
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in [*sorted(_SCHEMES), "file"])
        raise ValueError(f"Unknown URL scheme {scheme + '://'!r} in {url!r}; supported: {known}")
    if not netloc:
        raise ValueError(f"Argument `url` has no bucket: expected '{scheme}://bucket/prefix', given {url!r}")
    return scheme, netloc, path.strip("/")


def _saver_class(scheme: str) -> Any:
    module_name, class_name, extra, sdk = _SCHEMES[scheme]
    try:
        importlib.import_module(sdk)
    except ImportError as err:
        raise ImportError(f"{scheme}:// URLs need the {sdk} package: pip install ckptcloud[{extra}]") from err
    return getattr(importlib.import_module(module_name), class_name)


def saver_from_url(url: str, **options: Any) -> Any:
    """Build the saver for ``url``; ``options`` go to the saver's constructor.

    Example:
        >>> import tempfile
        >>> saver_from_url("file://" + tempfile.mkdtemp())  # doctest: +ELLIPSIS
        DiskSaver(dirname=..., save_on_rank=0)
    """
    scheme, bucket, prefix = split_url(url)
    if scheme == "file":
        return DiskSaver(prefix, **options)
    return _saver_class(scheme)(bucket, prefix, **options)


def load_checkpoint(source: str | Path, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Load a checkpoint from a local path or a URL (``s3://bucket/key.pt``, ...).

    The tensors are copied into ordinary memory (no ``mmap``): they usually go on to live in a model or an
    optimizer for the rest of the run, which would otherwise keep the temporary download mapped as long.

    A URL load sends only requests on the object itself (HEAD, then GET): no bucket check and no listing, so
    credentials that may read just the object (an S3 ``s3:GetObject`` policy on the prefix) are enough. A missing
    object raises ``FileNotFoundError`` and a denied one ``PermissionError``, both naming the object's URL.
    """
    if isinstance(source, str) and "://" in source:
        scheme, bucket, key = split_url(source)
        if scheme == "file":
            source = key
        else:
            if source.endswith("/") or not key:
                raise ValueError(
                    f"{source} names no object: give the checkpoint's URL, e.g. {scheme}://{bucket}/run/model_1.pt"
                )
            folder, _, filename = key.rpartition("/")
            saver = _saver_class(scheme)(bucket, folder, require_empty=False, check_bucket=False)
            return saver.load(
                check_filename(filename), map_location=map_location, weights_only=weights_only, mmap=False
            )
    return serialization.load(source, map_location=map_location, weights_only=weights_only)
