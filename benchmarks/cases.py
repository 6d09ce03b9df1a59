"""One benchmark measurement, run in a fresh process: ``python cases.py '<json spec>'`` prints one JSON line.

A fresh process per case keeps peak memory honest (``VmHWM`` counts only this case). This file imports neither
ckptcloud nor the benchmark driver at module level: the fsspec cases run it in their own environment
(``.venv-fsspec``, whose aiobotocore cannot share a venv with current boto3).

Measured per case: ``s`` wall seconds; ``blocked`` seconds until the training loop could go on (``save()``
returned; equals ``s`` for synchronous saves); ``extra`` peak RSS during the operation minus RSS before it
(bytes); ``cpu`` user+system CPU seconds of this process (all its threads) during the operation.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

MiB = 1024 * 1024
TENSOR_MIB = 128  # the state: float32 tensors of 128 MiB each (8 tensors at 1 GiB)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_state(size_mib: int, fast: bool = False) -> dict:
    """``size_mib`` of float32 tensors of 128 MiB each, random. ``fast``: one random tensor, the others it plus
    ``i`` (as incompressible, distinct values, but 1 GiB in ~0.5 s instead of ~4 s of ``randn`` here)."""
    import torch

    n = max(1, size_mib // TENSOR_MIB)
    per = size_mib * MiB // n // 4
    if not fast:
        return {f"layer{i}.weight": torch.randn(per) for i in range(n)}
    first = torch.randn(per)
    return {f"layer{i}.weight": first + i if i else first for i in range(n)}


class _Stateful:
    """A ready state dict, for Checkpoint (which calls ``state_dict()`` on what it saves)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


# ------------------------------------------------------------------------------------------------ ckptcloud
def _saver(spec: dict) -> Any:
    from ckptcloud.savers import AzureBlobSaver, GCSSaver, S3Saver

    options: dict[str, Any] = {"require_empty": False}
    for name, field in (("max_concurrency", "concurrency"), ("load_concurrency", "load_concurrency"),
                        ("part_size", "part_size")):  # fmt: skip
        if spec.get(field) is not None:  # absent or None: the saver's default (benchmarks/wan.py's "defaults")
            options[name] = spec[field]
    store, bucket = spec["store"], spec["bucket"]
    if store == "s3":  # the saver's own client (its checksum and signing settings are part of what is measured)
        return S3Saver(bucket, "bench", endpoint_url=spec["endpoint"], region_name="us-east-1", **options)
    if store == "gcs":
        return GCSSaver(bucket, "bench", client=sdk_client(spec), **options)
    return AzureBlobSaver(bucket, "bench", container_client=sdk_client(spec), **options)


def ckptcloud_save(spec: dict, saver: Any, state: dict, name: str) -> float | None:
    if spec["method"] == "ckptcloud-async":
        from ckptcloud import Checkpoint

        # the training loop's view: save() returns after a CPU snapshot; the upload runs in the background
        start = time.perf_counter()
        ckpt = Checkpoint({"state": _Stateful(state)}, saver, async_save=True, filename_pattern=name)
        ckpt.save(global_step=1)
        blocked = time.perf_counter() - start
        ckpt.wait()
        return blocked
    saver(state, name)
    return None


def ckptcloud_load(spec: dict, saver: Any, name: str) -> Any:
    return saver.load(name, mmap=True)  # one object saved: Checkpoint stores its state dict as is


# ------------------------------------------------------------------------------------------ the SDKs, naively
def sdk_client(spec: dict) -> Any:
    """The SDK's default client for the store (for Azure: the container's)."""
    store, endpoint = spec["store"], spec["endpoint"]
    if store == "s3":
        import boto3
        from botocore.config import Config

        config = Config(max_pool_connections=16, s3={"addressing_style": "path"})
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
    if store == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client("bench", AnonymousCredentials(), client_options={"api_endpoint": endpoint})
    from azure.storage.blob import ContainerClient

    return ContainerClient.from_connection_string(endpoint, spec["bucket"], api_version="2025-11-05")


def naive_save(spec: dict, client: Any, state: dict, key: str) -> None:
    """What most training scripts write: serialize into memory, then one SDK upload call."""
    import torch

    bucket, buf = spec["bucket"], io.BytesIO()
    torch.save(state, buf)
    if spec["store"] == "s3" and spec["method"] == "upload_fileobj":
        buf.seek(0)
        client.upload_fileobj(buf, bucket, key)  # boto3's managed transfer: 8 MiB parts, 10 threads
    elif spec["store"] == "s3":
        client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
    elif spec["store"] == "gcs":
        buf.seek(0)
        client.bucket(bucket).blob(key).upload_from_file(buf, size=buf.getbuffer().nbytes)
    else:
        client.upload_blob(key, buf.getvalue(), overwrite=True, max_concurrency=4)


def naive_load(spec: dict, client: Any, key: str) -> Any:
    import torch

    bucket = spec["bucket"]
    if spec["store"] == "s3" and spec["method"] == "upload_fileobj":
        buf = io.BytesIO()
        client.download_fileobj(bucket, key, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)
    if spec["store"] == "s3":
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    elif spec["store"] == "gcs":
        data = client.bucket(bucket).blob(key).download_as_bytes()
    else:
        data = client.download_blob(key, max_concurrency=4).readall()
    return torch.load(io.BytesIO(data), weights_only=True)


# ---------------------------------------------------------------------------------------------------- fsspec
def _fs(spec: dict) -> Any:
    """The filesystem, the way Lightning reaches remote checkpoints."""
    store, endpoint = spec["store"], spec["endpoint"]
    if store == "s3":
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=endpoint, client_kwargs={"region_name": "us-east-1"})
    if store == "gcs":
        import gcsfs

        return gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon", project="bench")
    import adlfs

    return adlfs.AzureBlobFileSystem(connection_string=endpoint)


def fsspec_save(spec: dict, fs: Any, state: dict, key: str) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    fs.pipe(f"{spec['bucket']}/{key}", buf.getvalue())


def fsspec_load(spec: dict, fs: Any, key: str) -> Any:
    import torch

    return torch.load(io.BytesIO(fs.cat(f"{spec['bucket']}/{key}")), weights_only=True)


# ------------------------------------------------------------------------------------------- s3torchconnector
def _s3torch(spec: dict) -> Any:
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    # it ignores AWS_ENDPOINT_URL_S3: pass endpoint=; spec["s3torch"]: other S3ClientConfig fields (benchmarks/wan.py)
    config = S3ClientConfig(force_path_style=True, **spec.get("s3torch", {}))
    return S3Checkpoint(region="us-east-1", endpoint=spec["endpoint"], s3client_config=config)


def s3torch_save(spec: dict, checkpoint: Any, state: dict, key: str) -> None:
    import torch

    with checkpoint.writer(f"s3://{spec['bucket']}/{key}") as writer:
        torch.save(state, writer)


def s3torch_load(spec: dict, checkpoint: Any, key: str) -> Any:
    import torch

    with checkpoint.reader(f"s3://{spec['bucket']}/{key}") as reader:
        return torch.load(reader, weights_only=True)


# ---------------------------------------------------------------------------- DCP through s3torchconnector
def _dcp_fs(spec: dict, reader_constructor: Any = None) -> Any:
    """s3torchconnector's DCP file system on ``spec``'s endpoint: its ``S3StorageWriter``/``Reader`` take no
    ``endpoint`` (and the CRT ignores ``AWS_ENDPOINT_URL_S3``), so their ``fs`` is replaced by one whose client has
    it; everything else is theirs."""
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    client = S3Client("us-east-1", endpoint=spec["endpoint"], s3client_config=S3ClientConfig(force_path_style=True))
    return S3FileSystem("us-east-1", s3_client=client, reader_constructor=reader_constructor)


def dcp_save(spec: dict, _: Any, state: dict, key: str) -> None:
    """``dcp.save`` in one process (no process group): DCP's default planner, s3torchconnector's writer."""
    import torch.distributed.checkpoint as dcp
    from s3torchconnector.dcp import S3StorageWriter

    path = f"s3://{spec['bucket']}/{key}"
    writer = S3StorageWriter(region="us-east-1", path=path)
    writer.fs = _dcp_fs(spec)
    writer.path = writer.fs.init_path(path)
    dcp.save(state, storage_writer=writer)


def dcp_load(spec: dict, _: Any, key: str) -> Any:
    """``dcp.load`` into preallocated tensors of the saved shapes (DCP loads in place), with the default
    (``dcp_optimized``) reader. The targets are allocated inside the timed region, as any other load's tensors."""
    import torch
    import torch.distributed.checkpoint as dcp
    from s3torchconnector.dcp import S3StorageReader

    path = f"s3://{spec['bucket']}/{key}"
    reader = S3StorageReader(region="us-east-1", path=path)
    reader.fs = _dcp_fs(spec, reader._reader_constructor)
    reader.path = reader.fs.init_path(path)
    metadata = reader.read_metadata()
    targets = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in metadata.state_dict_metadata.items()
    }
    dcp.load(targets, storage_reader=reader)
    return targets


# ------------------------------------------------------------------------------------- serialization floor
class _Discard:
    """A write-only stream that drops what it is given: ``torch.save`` with no I/O at all."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.n += n
        return n

    def flush(self) -> None:
        pass


def floor_save(spec: dict, _: Any, state: dict, key: str) -> None:
    import torch

    torch.save(state, _Discard())


def floor_load(spec: dict, _: Any, key: str) -> Any:
    """``torch.load`` of a file in tmpfs (``/dev/shm``), written before the clock starts (see :func:`run`)."""
    import torch

    return torch.load(_shm_path(spec), weights_only=True)


def _shm_path(spec: dict) -> str:
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(folder, f"ckptcloud-floor-{os.getpid()}-{spec['size']}.pt")


# -------------------------------------------------------------------------------------------------- the case
FAMILIES = {  # method -> (make the client once, untimed: a training job does it once; save; load)
    "ckptcloud": (_saver, ckptcloud_save, ckptcloud_load),
    "naive": (sdk_client, naive_save, naive_load),
    "upload_fileobj": (sdk_client, naive_save, naive_load),
    "fsspec": (_fs, fsspec_save, fsspec_load),
    "s3torchconnector": (_s3torch, s3torch_save, s3torch_load),
    "dcp-s3torchconnector": (lambda spec: None, dcp_save, dcp_load),
    "floor": (lambda spec: None, floor_save, floor_load),  # torch.save into a discarding sink; tmpfs torch.load
}


def run(spec: dict) -> dict:
    """``spec``: store, method, size (MiB), endpoint, bucket, phase (``save``/``load``), concurrency, tag."""
    import torch

    method, size = spec["method"], spec["size"]
    name = f"{method}-{spec.get('tag', '')}{size}.pt"
    family = "ckptcloud" if method.startswith("ckptcloud") else method
    key = name if family == "ckptcloud" else f"bench/{name}"  # the saver adds its prefix "bench/"
    local = os.path.join(tempfile.gettempdir(), f"ckptcloud-bench-{spec['store']}-{size}.pt")
    make, save, load = FAMILIES.get(family, (lambda spec: None, None, None))
    client = make(spec)
    if spec["phase"] == "save":
        state = make_state(size, spec.get("fast_state", False))
        before, cpu = _status("VmHWM"), _cpu()
        start = time.perf_counter()
        blocked = save(spec, client, state, key) if save else torch.save(state, local)
        seconds = time.perf_counter() - start
        blocked = seconds if blocked is None else blocked
        return {"s": seconds, "blocked": blocked, "extra": _status("VmHWM") - before, "cpu": _cpu() - cpu}
    if method == "floor":  # the file the tmpfs load floor reads, written untimed
        torch.save(make_state(size, fast=True), _shm_path(spec))
    before, cpu = _status("VmRSS"), _cpu()
    start = time.perf_counter()
    try:
        loaded = load(spec, client, key) if load else torch.load(local, weights_only=True)
    finally:
        if method == "floor":
            os.unlink(_shm_path(spec))
    for tensor in loaded.values():  # touch every page: tensors in memory, also where they map a file
        float(tensor.view(-1)[:: 4096 // tensor.element_size()].sum())
    seconds = time.perf_counter() - start
    if not load:
        os.unlink(local)
    result = {"s": seconds, "extra": _status("VmHWM") - before, "cpu": _cpu() - cpu}
    if sum(t.nbytes for t in loaded.values()) != size * MiB:
        raise AssertionError(f"{method} loaded {sum(t.nbytes for t in loaded.values())} bytes, not {size} MiB")
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
