"""Save and load a state dict to a local S3 server: ckptcloud against what users would otherwise write.

Every case runs in a fresh subprocess so peak memory is honest; all cases hit the same server in one run and
the table prints ratios to ckptcloud (shared, noisy machines: trust ratios, not absolute seconds).

    python benchmarks/bench_s3.py                      # 256 MiB and 1 GiB on SeaweedFS started here
    python benchmarks/bench_s3.py --sizes 64 --server moto
    python benchmarks/bench_s3.py --endpoint http://127.0.0.1:9000   # your MinIO (AWS_* credentials)

Methods: ``ckptcloud`` (S3Saver: streamed multipart save, download to a temp file + torch.load),
``naive`` (BytesIO + put_object / get_object().read() + torch.load), ``upload_fileobj`` (BytesIO +
boto3 managed transfer both ways), ``local`` (torch.save/torch.load of a file in the temp folder: the limit).
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
METHODS = ["ckptcloud", "naive", "upload_fileobj", "local"]


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


def run_case(method: str, size_mib: int, endpoint: str, bucket: str, phase: str) -> dict:
    """One measurement in this (fresh) process: ``phase`` is ``save`` or ``load``."""
    import boto3
    import torch
    from botocore.config import Config

    from ckptcloud.stores.s3 import S3Saver

    key = f"bench/{method}-{size_mib}.pt"
    client = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(max_pool_connections=16, s3={"addressing_style": "path"})
    )
    local_path = os.path.join(tempfile.gettempdir(), f"ckptcloud-bench-{size_mib}.pt")
    saver = S3Saver(bucket, "bench", client=client, require_empty=False)
    if phase == "save":
        state = make_state(size_mib)
        before = _status("VmHWM")
        start = time.perf_counter()
        if method == "ckptcloud":
            saver(state, f"{method}-{size_mib}.pt")
        elif method == "naive":
            buf = io.BytesIO()
            torch.save(state, buf)
            client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
        elif method == "upload_fileobj":
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            client.upload_fileobj(buf, bucket, key)
        else:
            torch.save(state, local_path)
        seconds = time.perf_counter() - start
        return {"s": seconds, "extra": _status("VmHWM") - before}
    before = _status("VmRSS")
    start = time.perf_counter()
    if method == "ckptcloud":
        loaded = saver.load(f"{method}-{size_mib}.pt")
    elif method == "naive":
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        loaded = torch.load(io.BytesIO(body), weights_only=True)
    elif method == "upload_fileobj":
        buf = io.BytesIO()
        client.download_fileobj(bucket, key, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
    else:
        loaded = torch.load(local_path, weights_only=True)
        os.unlink(local_path)
    seconds = time.perf_counter() - start
    assert sum(t.nbytes for t in loaded.values()) == size_mib * MiB
    return {"s": seconds, "extra": _status("VmHWM") - before}


def measure(method: str, size_mib: int, endpoint: str, bucket: str, phase: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", method, str(size_mib), endpoint, bucket, phase],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{method} {size_mib} MiB {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict, sizes: list[int], methods: list[str]) -> str:
    head = (
        "| method | size | save s | save MB/s | save peak extra MiB | load s | load MB/s | load peak MiB (x ckpt) "
        "| save s vs ckptcloud | save mem vs ckptcloud | load s vs ckptcloud |"
    )
    lines = [head, "|" + "---|" * 11]
    for size in sizes:
        ref = results[("ckptcloud", size)]
        for method in methods:
            r = results[(method, size)]
            mb = size * MiB / 1e6
            lines.append(
                f"| {method} | {size} MiB | {r['save']['s']:.2f} | {mb / r['save']['s']:.0f} "
                f"| {r['save']['extra'] / MiB:.0f} | {r['load']['s']:.2f} | {mb / r['load']['s']:.0f} "
                f"| {r['load']['extra'] / MiB:.0f} ({r['load']['extra'] / (size * MiB):.2f}x) "
                f"| {r['save']['s'] / ref['save']['s']:.2f} "
                f"| {max(r['save']['extra'], 1) / max(ref['save']['extra'], 1):.2f} "
                f"| {r['load']['s'] / ref['load']['s']:.2f} |"
            )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        method, size, endpoint, bucket, phase = sys.argv[2:7]
        print(json.dumps(run_case(method, int(size), endpoint, bucket, phase)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024", help="checkpoint sizes in MiB, comma-separated")
    parser.add_argument("--server", choices=["seaweedfs", "moto"], default="seaweedfs")
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of starting a server")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    from ckptcloud.stores.s3 import make_s3_client
    from ckptcloud.testing import servers

    server = None
    endpoint = args.endpoint
    if endpoint is None:
        server = servers.start_seaweedfs() if args.server == "seaweedfs" else servers.start_moto()
        endpoint = server.endpoint
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    make_s3_client(endpoint_url=endpoint).create_bucket(Bucket=bucket)
    label = args.server if server else endpoint
    print(f"# S3 save/load benchmark on {label}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    results: dict = {}
    try:
        for size in sizes:
            for method in methods:
                save = measure(method, size, endpoint, bucket, "save")
                load = measure(method, size, endpoint, bucket, "load")
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
