"""Every Python example in the README runs as pasted, against the suite's S3 server (bucket ``my-bucket``).

Blocks run in order in one namespace, like a reader pasting them into one session. A block preceded by an
``<!-- no-test: reason -->`` line is skipped (it needs something the suite does not have, e.g. a MinIO).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"(<!-- no-test[^>]*-->\n)?```python\n(.*?)```", text, flags=re.S):
        if match.group(1) is None:
            blocks.append(match.group(2))
    return blocks


def test_readme_python_examples_run(s3_endpoint, s3_client, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    s3_client.create_bucket(Bucket="my-bucket")
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
        kept = namespace["checkpoint"].save_handler.list()
        assert kept == ["checkpoint_4_val_acc=0.7000.pt", "checkpoint_5_val_acc=0.7500.pt"]
    finally:
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket="my-bucket"):
            for obj in page.get("Contents", []):
                s3_client.delete_object(Bucket="my-bucket", Key=obj["Key"])
        s3_client.delete_bucket(Bucket="my-bucket")
