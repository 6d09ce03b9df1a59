"""Peak memory of one Lightning save to S3: Lightning's default (fsspec + s3fs) against ``CloudCheckpointIO``.

What is measured: ``trainer.save_checkpoint("s3://...")`` of a model of ``--size`` MiB (one bias-free ``Linear``,
trained one step with plain SGD, so the checkpoint is the weights plus Lightning's small state), in a fresh
process per case, against a local SeaweedFS. ``extra`` is the process's peak RSS during the save minus its RSS just
before (the peak is reset first through ``/proc/self/clear_refs``), after a small warm-up save that builds each
path's client, as every save after the first one in a training run finds it. Cases run interleaved, ``--rounds``
times; the table gives the median and the range.

Cases:
- ``fsspec``: Lightning's ``TorchCheckpointIO`` (no plugin), which reaches ``s3://`` through fsspec and s3fs:
  ``torch.save`` into a ``BytesIO``, then ``fs.pipe(url, buffer.getvalue())``. s3fs cannot live in ckptcloud's venv
  (its aiobotocore pins botocore < 1.43.118; boto3 1.44 needs botocore 1.44), so it runs with ``--s3fs-path``, a
  folder made with ``pip install --target .venv-s3fs s3fs`` that is put first on ``PYTHONPATH`` for that case only.
- ``cloud``: ``plugins=[CloudCheckpointIO()]`` with its defaults (16 MiB parts, 8 in flight).
- ``cloud-async``: ``CloudCheckpointIO(async_save=True)``; ``blocked`` is how long ``save_checkpoint`` held the
  training loop, ``s`` the whole save, up to the end of the upload.
- ``local``: ``TorchCheckpointIO`` to a local file (Lightning 2.6 also goes through a ``BytesIO`` there).

    python benchmarks/lightning_memory.py --s3fs-path .venv-s3fs            # 256 MiB, 3 rounds
    python benchmarks/lightning_memory.py --size 64 --rounds 1 --cases cloud,local
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
CASES = ["fsspec", "cloud", "cloud-async", "local"]


# ------------------------------------------------------------------------------------------ one case (child)
def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS (Linux 4.0+)


def run_case(spec: dict) -> dict:
    """Train one step, warm the path up, then measure one ``trainer.save_checkpoint``."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    case, endpoint, bucket = spec["case"], spec["endpoint"], spec["bucket"]
    n = int(math.sqrt(spec["size"] * MiB / 4))

    class Big(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(n, n, bias=False)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(1, n)), batch_size=1)

    plugins = []
    if case.startswith("cloud"):
        sys.path.insert(0, str(ROOT))
        from ckptcloud.lightning import CloudCheckpointIO

        plugins = [CloudCheckpointIO(endpoint_url=endpoint, async_save=case == "cloud-async")]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Big()
    trainer.fit(model)
    model.zero_grad(set_to_none=True)  # the gradients are not part of the checkpoint

    tag = f"{case}-{spec['tag']}"
    if case == "local":
        target = os.path.join(tempfile.mkdtemp(prefix="ckptcloud-bench-"), f"{tag}.ckpt")
    else:
        target = f"s3://{bucket}/bench/{tag}.ckpt"
    if case == "fsspec":  # the same cached S3FileSystem instance that Lightning's save will use
        import fsspec

        fs = fsspec.filesystem("s3")
        assert type(fs).__module__.startswith("s3fs"), type(fs)
        fs.pipe(f"{bucket}/bench/warm-{tag}", b"warm-up")
    elif case.startswith("cloud"):
        plugins[0].save_checkpoint({"warm-up": torch.ones(1)}, f"s3://{bucket}/bench/warm-{tag}")
        plugins[0].teardown()

    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    trainer.save_checkpoint(target)
    blocked = time.perf_counter() - start
    trainer.strategy.checkpoint_io.teardown()  # an async save finishes here
    seconds = time.perf_counter() - start
    extra = _status("VmHWM") - before
    weights = model.layer.weight.nbytes
    if case == "local":
        stored = os.path.getsize(target)
        os.unlink(target)
    else:
        stored = _object_size(endpoint, bucket, f"bench/{tag}.ckpt") if case != "fsspec" else fs.size(target)
    assert stored >= weights, f"{case}: stored {stored} bytes, less than the {weights} bytes of weights"
    return {"case": case, "extra": extra, "s": seconds, "blocked": blocked, "stored": stored, "weights": weights}


def _object_size(endpoint: str, bucket: str, key: str) -> int:
    from ckptcloud.stores.s3_client import make_s3_client

    client = make_s3_client(endpoint_url=endpoint, region_name="us-east-1")
    return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])


# ------------------------------------------------------------------------------------------------ the driver
def _child_env(case: str, endpoint: str, s3fs_path: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,  # s3fs's botocore reads it
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # fsspec's config for s3fs.S3FileSystem(), as Lightning makes it
    }
    env.pop("PYTHONPATH", None)
    if case == "fsspec" and s3fs_path:
        env["PYTHONPATH"] = str(Path(s3fs_path).resolve())
    return env


def run_child(spec: dict, s3fs_path: str | None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=900,
        env=_child_env(spec["case"], spec["endpoint"], s3fs_path),
        cwd=tempfile.gettempdir(),  # Lightning writes nothing here (logger=False), but never into the checkout
    )
    if out.returncode != 0:
        raise RuntimeError(f"case {spec['case']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _s3fs_available(s3fs_path: str | None) -> bool:
    env = _child_env("fsspec", "http://127.0.0.1:1", s3fs_path)
    probe = subprocess.run([sys.executable, "-c", "import s3fs"], env=env, capture_output=True)
    return probe.returncode == 0


def summarize(results: list[dict]) -> str:
    """A table of median [min-max] per case: extra peak RSS (MiB), seconds, and seconds the loop was blocked."""
    lines = [
        f"{'case':<12} {'extra peak RSS, MiB':<26} {'save, s':<22} {'blocked, s':<22} stored, MiB",
        "-" * 96,
    ]

    def cell(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    for case in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == case]
        extra = cell([r["extra"] / MiB for r in rows], ".0f")
        seconds = cell([r["s"] for r in rows], ".2f")
        blocked = cell([r["blocked"] for r in rows], ".2f")
        lines.append(f"{case:<12} {extra:<26} {seconds:<22} {blocked:<22} {rows[0]['stored'] / MiB:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="model size in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    parser.add_argument("--s3fs-path", help="a folder holding s3fs (pip install --target DIR s3fs) for 'fsspec'")
    parser.add_argument("--out", help="also write the raw results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return

    sys.path.insert(0, str(ROOT))
    from ckptcloud.stores.s3_client import make_s3_client
    from ckptcloud.testing import servers

    cases = [c for c in args.cases.split(",") if c]
    if "fsspec" in cases and not _s3fs_available(args.s3fs_path):
        print("fsspec: skipped (s3fs not importable; pass --s3fs-path, see the module docstring)", file=sys.stderr)
        cases.remove("fsspec")
    server = servers.start_seaweedfs()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret")
        client = make_s3_client(endpoint_url=server.endpoint, region_name="us-east-1")
        bucket = f"lightning-bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        results = []
        for round_ in range(args.rounds):
            for case in cases:  # interleaved: a slow spell of the shared machine hits every case alike
                spec = {"case": case, "endpoint": server.endpoint, "bucket": bucket, "size": args.size}
                spec["tag"] = f"r{round_}"
                result = run_child(spec, args.s3fs_path)
                results.append(result)
                print(f"round {round_ + 1}: {case:<12} extra {result['extra'] / MiB:6.0f} MiB  {result['s']:.2f} s")
                for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):  # free the server's disk
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
    finally:
        server.stop()
    weights = results[0]["weights"] / MiB
    print(f"\nLightning save of a {weights:.0f} MiB model to SeaweedFS, {args.rounds} rounds: median [min-max]")
    print(summarize(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"size": args.size, "results": results}, indent=1))


if __name__ == "__main__":
    main()
