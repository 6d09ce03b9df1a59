"""One rank of one sharded benchmark case, torchrun style: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` in the
environment, ``python sharded_cases.py '<json spec>'``; rank ``r`` writes ``{out}/rank{r}.json``.

The driver (:mod:`sharded`) starts ``world`` such processes per case. Each rank builds its share of the state,
saves it, then loads it back into the same (zeroed) tensors, so that save and load of one case see the same state:

- the state: ``size`` MiB of float32 in total, as 128 MiB global tensors (8 at 1 GiB), each a ``DTensor`` sharded
  on dim 0 over a 1-D CPU mesh (``Shard(0)``): every rank holds ``1/world`` of every tensor, as FSDP2 would;
- ``save``: from a barrier to the end of the method's save on this rank; ``load``: likewise for the load. The driver
  reports the max over ranks;
- ``extra``: peak RSS during the operation (``VmHWM``, reset before it through ``/proc/self/clear_refs``) minus RSS
  just before it (the state is built: for loads, the zeroed tensors loaded into);
- ``cpu``: user+system seconds of this process (all its threads, a Rust or asyncio client's too) during it.

Like :mod:`cases`, nothing from ckptcloud or the driver is imported at module level: the fsspec method runs this
file with ``.venv-fsspec``'s python.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, also from .venv-fsspec

from cases import _cpu, _status  # stdlib only, like this file

MiB = 1024 * 1024
TENSOR_MIB = 128


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: writing 5 to ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def make_state(size_mib: int, rank: int, world: int) -> dict[str, Any]:
    """This rank's share of a ``size_mib`` state: 128 MiB float32 tensors, ``DTensor``s sharded on dim 0."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    n = max(1, size_mib // TENSOR_MIB)
    rows = size_mib * MiB // n // 4 // 1024  # each global tensor: rows x 1024 float32
    generator = torch.Generator().manual_seed(rank)
    state = {}
    for i in range(n):
        local = torch.randn(rows // world, 1024, generator=generator)
        state[f"layer{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return state


def _locals(state: dict[str, Any]) -> list[Any]:
    return [t.to_local() for t in state.values()]


# ------------------------------------------------------------------------------------------------ the methods
def _dcp_writer_reader(spec: dict, url: str) -> tuple[Any, Any]:
    """The storage writer and reader of a DCP method, made before the clock starts (a job makes its clients once)."""
    method, endpoint = spec["method"], spec["endpoint"]
    if method == "ckptcloud":
        from ckptcloud.dcp import CloudStorageReader, CloudStorageWriter

        options = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        return CloudStorageWriter(url, **options), CloudStorageReader(url, **options)
    if method == "s3torchconnector":
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
        from s3torchconnector.dcp.s3_file_system import S3FileSystem

        config = S3ClientConfig(force_path_style=True)
        writer = S3StorageWriter("us-east-1", url, s3client_config=config)
        reader = S3StorageReader("us-east-1", url, s3client_config=config)
        # its DCP classes take no endpoint (and the client ignores AWS_ENDPOINT_URL_S3): the same file systems, with
        # a client that has one; the reader keeps its default (dcp_optimized) reader constructor
        client = S3Client("us-east-1", endpoint=endpoint, s3client_config=config)
        writer.fs = S3FileSystem("us-east-1", s3_client=client)
        reader.fs = S3FileSystem("us-east-1", s3_client=client, reader_constructor=reader._reader_constructor)
        return writer, reader
    if method == "fsspec":
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        options = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        return FsspecWriter(url, **options), FsspecReader(url, **options)
    raise ValueError(f"unknown DCP method {method!r}")


def _rank0_saver(spec: dict) -> Any:
    from ckptcloud.savers import S3Saver

    return S3Saver(spec["bucket"], spec["prefix"], endpoint_url=spec["endpoint"], region_name="us-east-1",
                   require_empty=False)  # fmt: skip


def _rank0_save(saver: Any, state: dict[str, Any], rank: int, world: int) -> None:
    """Gather every rank's shard into full tensors on rank 0 (``dist.gather`` straight into the full tensor's
    row blocks: no concatenation copy), then one ``torch.save`` file streamed by ``S3Saver`` from rank 0."""
    import torch
    import torch.distributed as dist

    full: dict[str, Any] = {}
    for name, tensor in state.items():
        local = tensor.to_local()
        if rank == 0:
            whole = torch.empty((local.shape[0] * world, *local.shape[1:]), dtype=local.dtype)
            dist.gather(local, gather_list=list(whole.chunk(world)), dst=0)
            full[name] = whole
        else:
            dist.gather(local, dst=0)
    if rank == 0:
        saver(full, "state.pt")
    del full
    dist.barrier()


def _rank0_load(saver: Any, state: dict[str, Any], rank: int, world: int) -> None:
    """Rank 0 loads the file (``S3Saver.load(mmap=True)``: ranged GETs into a temp file, mapped), then scatters
    each tensor's row blocks into every rank's shard (``dist.scatter``)."""
    import torch.distributed as dist

    loaded = saver.load("state.pt", mmap=True) if rank == 0 else None
    for name, tensor in state.items():
        local = tensor.to_local()
        chunks = list(loaded[name].chunk(world)) if loaded is not None else None
        dist.scatter(local, scatter_list=chunks, src=0)
    del loaded
    dist.barrier()


def _checksums(state: dict[str, Any]) -> list[float]:
    return [float(t.double().sum()) for t in _locals(state)]


def run(spec: dict, rank: int, world: int) -> dict:
    """Save then load this rank's share with ``spec['method']``; the measurements of both."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)  # ranks share the cores, as torchrun's OMP_NUM_THREADS=1 default does
        state = make_state(spec["size"], rank, world)
        sums = _checksums(state)
        method = spec["method"]
        url = f"s3://{spec['bucket']}/{spec['prefix']}"
        if method == "ckptcloud-rank0":
            saver = _rank0_saver(spec) if rank == 0 else None

            def save() -> None:
                _rank0_save(saver, state, rank, world)

            def load() -> None:
                _rank0_load(saver, state, rank, world)
        else:
            writer, reader = _dcp_writer_reader(spec, url)

            def save() -> None:
                dcp.save(state, storage_writer=writer)

            def load() -> None:
                dcp.load(state, storage_reader=reader)

        result = {}
        for phase, operation in (("save", save), ("load", load)):
            if phase == "load":
                for tensor in _locals(state):
                    tensor.zero_()
            dist.barrier()
            _reset_peak()
            before, cpu = _status("VmRSS"), _cpu()
            start = time.perf_counter()
            operation()
            seconds = time.perf_counter() - start
            result[phase] = {"s": seconds, "extra": _status("VmHWM") - before, "cpu": _cpu() - cpu}
            dist.barrier()
        if _checksums(state) != sums:
            raise AssertionError(f"rank {rank}: {method} loaded different values than it saved")
        return result
    finally:
        dist.destroy_process_group()


def main() -> None:
    spec = json.loads(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(spec["out"]) / f"rank{rank}.json"
    try:
        result = run(spec, rank, world)
    except BaseException:
        out.write_text(json.dumps({"crash": traceback.format_exc()}))
        raise
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
