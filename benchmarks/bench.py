"""Save and load a state dict to a local object store: ckptcloud against what users would otherwise write.

Every case runs in a fresh subprocess so peak memory is honest; all cases hit the same server in one run and
the table prints ratios to ckptcloud (shared, noisy machines: trust ratios, not absolute seconds).

    python benchmarks/bench.py                          # S3: 256 MiB and 1 GiB on SeaweedFS started here
    python benchmarks/bench.py --store gcs --sizes 64,256   # fake-gcs-server started here
    python benchmarks/bench.py --store azure --sizes 256    # Azurite started here
    python benchmarks/bench.py --endpoint http://127.0.0.1:9000   # your MinIO (AWS_* credentials)

Methods: ``ckptcloud`` (streamed multipart save; download to a temp file + torch.load); ``naive`` (BytesIO +
one SDK upload call / one download into memory + torch.load); ``upload_fileobj`` (S3 only: BytesIO + boto3's
managed transfer both ways); ``local`` (torch.save/torch.load of a file in the temp folder: the limit).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

MiB = 1024 * 1024
METHODS = {"s3": ["ckptcloud", "ckptcloud-async", "naive", "upload_fileobj", "local"],
           "gcs": ["ckptcloud", "ckptcloud-async", "naive", "local"],
           "azure": ["ckptcloud", "ckptcloud-async", "naive", "local"]}  # fmt: skip


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def make_state(size_mib: int) -> dict:
    import torch

    n = max(1, size_mib // 128)
    per = size_mib * MiB // n // 4
    return {f"layer{i}.weight": torch.randn(per) for i in range(n)}


class Target:
    """One store in the child process: the ckptcloud saver and the SDK calls the naive method uses."""

    def __init__(self, store: str, endpoint: str, bucket: str) -> None:
        self.store, self.bucket = store, bucket
        if store == "s3":
            import boto3
            from botocore.config import Config

            from ckptcloud.savers import S3Saver

            config = Config(max_pool_connections=16, s3={"addressing_style": "path"})
            self.client = boto3.client("s3", endpoint_url=endpoint, config=config)
            self.saver = S3Saver(bucket, "bench", client=self.client, require_empty=False)
        elif store == "gcs":
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            from ckptcloud.savers import GCSSaver

            options = {"api_endpoint": endpoint}
            self.client = storage.Client(project="bench", credentials=AnonymousCredentials(), client_options=options)
            self.saver = GCSSaver(bucket, "bench", client=self.client, require_empty=False)
        else:
            from azure.storage.blob import ContainerClient

            from ckptcloud.savers import AzureBlobSaver

            self.client = ContainerClient.from_connection_string(endpoint, bucket, api_version="2025-11-05")
            self.saver = AzureBlobSaver(bucket, "bench", container_client=self.client, require_empty=False)

    def naive_put(self, key: str, data: bytes) -> None:
        if self.store == "s3":
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        elif self.store == "gcs":
            self.client.bucket(self.bucket).blob(key).upload_from_file(io.BytesIO(data), size=len(data))
        else:
            self.client.upload_blob(key, data, overwrite=True, max_concurrency=4)

    def naive_get(self, key: str) -> bytes:
        if self.store == "s3":
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        if self.store == "gcs":
            return self.client.bucket(self.bucket).blob(key).download_as_bytes()
        return self.client.download_blob(key, max_concurrency=4).readall()


class _Stateful:
    """Wraps a ready state dict for Checkpoint (which calls ``state_dict()`` on what it saves)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def run_case(store: str, method: str, size_mib: int, endpoint: str, bucket: str, phase: str) -> dict:
    """One measurement in this (fresh) process: ``phase`` is ``save`` or ``load``."""
    import torch

    target = Target(store, endpoint, bucket)
    name = f"{method}-{size_mib}.pt"
    key = f"bench/{name}"
    local_path = os.path.join(tempfile.gettempdir(), f"ckptcloud-bench-{store}-{size_mib}.pt")
    if phase == "save":
        state = make_state(size_mib)
        before = _status("VmHWM")
        start = time.perf_counter()
        blocked = None
        if method == "ckptcloud-async":
            from ckptcloud import Checkpoint

            # the training loop's view: save() returns after a CPU snapshot; the upload runs in the background
            ckpt = Checkpoint({"state": _Stateful(state)}, target.saver, async_save=True, filename_pattern=name)
            ckpt.save(global_step=1)
            blocked = time.perf_counter() - start
            ckpt.wait()
        elif method == "ckptcloud":
            target.saver(state, name)
        elif method == "local":
            torch.save(state, local_path)
        else:
            buf = io.BytesIO()
            torch.save(state, buf)
            if method == "naive":
                target.naive_put(key, buf.getvalue())
            else:
                buf.seek(0)
                target.client.upload_fileobj(buf, bucket, key)
        seconds = time.perf_counter() - start
        return {"s": seconds, "blocked": seconds if blocked is None else blocked, "extra": _status("VmHWM") - before}
    before = _status("VmRSS")
    start = time.perf_counter()
    if method.startswith("ckptcloud"):
        loaded = target.saver.load(name)
    elif method == "naive":
        loaded = torch.load(io.BytesIO(target.naive_get(key)), weights_only=True)
    elif method == "upload_fileobj":
        buf = io.BytesIO()
        target.client.download_fileobj(bucket, key, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
    else:
        loaded = torch.load(local_path, weights_only=True)
        os.unlink(local_path)
    seconds = time.perf_counter() - start
    assert sum(t.nbytes for t in loaded.values()) == size_mib * MiB
    return {"s": seconds, "extra": _status("VmHWM") - before}


def measure(store: str, method: str, size_mib: int, endpoint: str, bucket: str, phase: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", store, method, str(size_mib), endpoint, bucket, phase],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{method} {size_mib} MiB {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict, sizes: list[int], methods: list[str]) -> str:
    head = (
        "| method | size | save s | blocked s | save MB/s | save peak extra MiB | load s | load MB/s "
        "| load peak MiB (x ckpt) | save s vs ckptcloud | blocked vs ckptcloud | save mem vs ckptcloud "
        "| load s vs ckptcloud |"
    )
    lines = [head, "|" + "---|" * 13]
    for size in sizes:
        ref = results[("ckptcloud", size)]
        for method in methods:
            r = results[(method, size)]
            mb = size * MiB / 1e6
            lines.append(
                f"| {method} | {size} MiB | {r['save']['s']:.2f} | {r['save']['blocked']:.2f} "
                f"| {mb / r['save']['s']:.0f} "
                f"| {r['save']['extra'] / MiB:.0f} | {r['load']['s']:.2f} | {mb / r['load']['s']:.0f} "
                f"| {r['load']['extra'] / MiB:.0f} ({r['load']['extra'] / (size * MiB):.2f}x) "
                f"| {r['save']['s'] / ref['save']['s']:.2f} | {r['save']['blocked'] / ref['save']['blocked']:.2f} "
                f"| {max(r['save']['extra'], 1) / max(ref['save']['extra'], 1):.2f} "
                f"| {r['load']['s'] / ref['load']['s']:.2f} |"
            )
    return "\n".join(lines)


def start_server(store: str, s3_server: str, endpoint: str | None) -> tuple:
    """Start the emulator for ``store`` unless ``endpoint`` is given; returns (server, endpoint, label)."""
    from ckptcloud.testing import servers

    if endpoint is not None:
        return None, endpoint, "the given endpoint"
    if store == "s3":
        server = servers.start_seaweedfs() if s3_server == "seaweedfs" else servers.start_moto()
        return server, server.endpoint, s3_server
    if store == "gcs":
        server = servers.start_fake_gcs()
        return server, server.endpoint, "fake-gcs-server"
    server = servers.start_azurite()
    return server, server.extra["connection_string"], "Azurite"


def create_bucket(store: str, endpoint: str, bucket: str) -> None:
    if store == "s3":
        from ckptcloud.stores.s3 import make_s3_client

        make_s3_client(endpoint_url=endpoint).create_bucket(Bucket=bucket)
    elif store == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        options = {"api_endpoint": endpoint}
        storage.Client(project="bench", credentials=AnonymousCredentials(), client_options=options).create_bucket(
            bucket
        )
    else:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(endpoint, api_version="2025-11-05").create_container(bucket)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        store, method, size, endpoint, bucket, phase = sys.argv[2:8]
        print(json.dumps(run_case(store, method, int(size), endpoint, bucket, phase)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="checkpoint sizes in MiB, comma-separated")
    parser.add_argument("--store", choices=sorted(METHODS), default="s3")
    parser.add_argument("--server", choices=["seaweedfs", "moto"], default="seaweedfs", help="S3 server to start")
    parser.add_argument(
        "--endpoint", help="use this server instead of starting one (S3/GCS: URL; Azure: connection string)"
    )
    parser.add_argument("--methods", help="comma-separated subset of the store's methods")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",") if args.methods else METHODS[args.store]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    server, endpoint, label = start_server(args.store, args.server, args.endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    create_bucket(args.store, endpoint, bucket)
    print(f"# {args.store} save/load benchmark on {label}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    results: dict = {}
    try:
        for size in sizes:
            for method in methods:
                save = measure(args.store, method, size, endpoint, bucket, "save")
                load = measure(args.store, method, size, endpoint, bucket, "load")
                results[(method, size)] = {"save": save, "load": load}
                print(f"  {method:>15} {size:>5} MiB  save {save['s']:.2f} s  load {load['s']:.2f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
    print()
    print(table(results, sizes, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
