"""Runs inside the torch_xla environment (.venv-xla: torch 2.9.0 + torch-xla 2.9.0, PJRT_DEVICE=CPU).

    python xla_worker.py single ENDPOINT BUCKET DISKDIR   # train on the XLA device, checkpoint to S3 and disk
    python xla_worker.py ranks ENDPOINT BUCKET            # two XLA ranks (CPU_NUM_DEVICES=2) save through S3Saver

Prints one JSON line per rank with what it did. Driven by tests/xla/test_xla.py from the main environment.
"""

from __future__ import annotations

import json
import sys

import torch
import torch_xla
import torch_xla.runtime as xr

from ckptcloud import Checkpoint, DiskSaver
from ckptcloud.savers import S3Saver


def train_on_xla(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    device = torch_xla.device()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 8, device=device)).pow(2).mean().backward()
        optimizer.step()
        torch_xla.sync()
    return model, optimizer


def single(endpoint: str, bucket: str, diskdir: str) -> None:
    model, optimizer = train_on_xla()
    assert next(model.parameters()).device.type == "xla"
    to_save = {"model": model, "optimizer": optimizer}
    s3 = Checkpoint(to_save, S3Saver(bucket, "xla", endpoint_url=endpoint, region_name="us-east-1"), n_saved=1)
    disk = Checkpoint(to_save, DiskSaver(diskdir), n_saved=1)
    print(json.dumps({"s3": s3.save(global_step=3), "disk": disk.save(global_step=3),
                      "weight": model.weight.detach().cpu().tolist()}))  # fmt: skip


def _rank(index: int, endpoint: str, bucket: str) -> None:
    model, _ = train_on_xla(steps=1)
    saver = S3Saver(bucket, "ranks", endpoint_url=endpoint, region_name="us-east-1", require_empty=False)
    saver({"model": model.state_dict()}, "model.pt")
    print(json.dumps({"ordinal": xr.global_ordinal(), "world": xr.world_size(), "returned": True}), flush=True)


def ranks(endpoint: str, bucket: str) -> None:
    torch_xla.launch(_rank, args=(endpoint, bucket))


if __name__ == "__main__":
    {"single": single, "ranks": ranks}[sys.argv[1]](*sys.argv[2:])
