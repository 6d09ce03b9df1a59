"""The demo: train a small model in a plain PyTorch loop, checkpoint every epoch to S3 keeping the best
``n_saved`` by validation accuracy, then restore the best one.

Without ``--url`` it starts a local S3 server (moto_server, from ``pip install ckptcloud[dev]``) on a free port,
so no cloud account is needed. With ``--url s3://bucket/prefix`` it uses your bucket and your AWS credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

from ckptcloud import Checkpoint


def make_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A small 3-class problem: points around three centres, split into train and validation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = torch.randint(0, 3, (1200,), generator=g)
    points = centres[labels] + 1.3 * torch.randn(1200, 2, generator=g)
    return points[:1000], labels[:1000], points[1000:], labels[1000:]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """Start moto_server on a free port, create a bucket, yield its URL; stop the server afterwards."""
    from ckptcloud.testing.servers import start_moto

    try:
        server = start_moto()
    except FileNotFoundError as err:
        raise SystemExit("the demo's local S3 server needs moto: pip install 'ckptcloud[dev]'") from err
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
    try:
        from ckptcloud.stores.s3 import make_s3_client

        make_s3_client().create_bucket(Bucket="ckptcloud-demo")
        print(f"started a local S3 server (moto_server) at {server.endpoint}")
        yield f"s3://ckptcloud-demo/run-{time.strftime('%Y%m%d-%H%M%S')}"
    finally:
        server.stop()


def train(url: str, epochs: int, n_saved: int) -> float:
    """Train, checkpoint each epoch to ``url``, restore the best; returns the restored model's accuracy."""
    torch.manual_seed(0)
    x_train, y_train, x_val, y_val = make_data()
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.004, momentum=0.9)
    to_save = {"model": model, "optimizer": optimizer}
    checkpoint = Checkpoint(to_save, url, n_saved=n_saved, score_name="val_acc")

    for epoch in range(1, epochs + 1):
        for i in range(0, len(x_train), 50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[i : i + 50]), y_train[i : i + 50]).backward()
            optimizer.step()
        val_acc = accuracy(model, x_val, y_val)
        saved = checkpoint.save(global_step=epoch, score=val_acc)
        print(f"epoch {epoch}: val_acc={val_acc:.4f} -> {'saved ' + saved if saved else 'not kept'}")

    saver = checkpoint.save_handler
    print(f"kept {len(checkpoint.state_dict()['_saved'])} checkpoint(s) under {saver.url('')}:")
    for priority, filename in checkpoint.state_dict()["_saved"]:
        print(f"  {saver.url(filename)}  (val_acc={priority:.4f})")

    best_url = saver.url(str(checkpoint.last_checkpoint))
    fresh = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
    Checkpoint.load_objects({"model": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=0.05)}, best_url)
    restored = accuracy(fresh, x_val, y_val)
    print(f"restored {best_url}: val_acc={restored:.4f}")
    return restored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptcloud demo", description=__doc__)
    parser.add_argument("--url", help="s3://bucket/prefix (default: a local S3 server started for the demo)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-saved", type=int, default=2)
    args = parser.parse_args(argv)
    if args.url:
        train(args.url, args.epochs, args.n_saved)
        return 0
    with local_s3() as url:
        train(url, args.epochs, args.n_saved)
    return 0
