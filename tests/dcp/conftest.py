"""Fixtures of the sharded-checkpoint tests."""

from __future__ import annotations

import pytest

from tests.conftest import AZURITE_API_VERSION

MiB = 1024 * 1024


@pytest.fixture(params=["s3", "gcs", "azure"])
def place(request):
    """``(url of a fresh folder, options)`` on each emulator."""
    kind = request.param
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/runs", {"endpoint_url": endpoint.url, "region_name": "us-east-1", "part_size": 5 * MiB}
    if kind == "gcs":
        bucket = request.getfixturevalue("gcs_bucket")
        return f"gs://{bucket}/runs", {"client": request.getfixturevalue("gcs_client"), "part_size": 1 * MiB}
    container = request.getfixturevalue("azure_container")
    conn = request.getfixturevalue("azure_endpoint").url
    return f"az://{container}/runs", {"connection_string": conn, "api_version": AZURITE_API_VERSION, "part_size": MiB}
