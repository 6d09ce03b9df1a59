"""Spawned rank processes for multi-rank tests (gloo on CPU): start, bound in time, collect each rank's result.

Each rank's function gets ``(rank, *args)`` and writes ``{out}/rank{rank}.json`` (a ``"crash"`` key holds the
traceback of anything it raised). No numpy: the minimal-install CI stage runs the tests that use this.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from ckptcloud.testing.faultproxy import FaultProxy


def spawn_ranks(rank_main: Callable[..., None], world: int, args: tuple, out: Path, timeout_s: int) -> list[dict]:
    """Run ``world`` spawned ranks of ``rank_main``; fail the test if they outlive ``timeout_s`` or one crashed."""
    ctx = mp.start_processes(rank_main, args=args, nprocs=world, join=False, start_method="spawn")
    for _ in range(timeout_s):
        if ctx.join(timeout=1):
            break
    else:
        for process in ctx.processes:
            process.kill()
        pytest.fail(f"ranks still running after {timeout_s} s: a rank is stuck (barrier or collective)")
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]
    for result in results:
        assert "crash" not in result, result["crash"]
    return results


def spawn_ranks_through_proxy(
    rank_main: Callable[..., None], world: int, endpoint: str, args: Callable[[str], tuple], out: Path, timeout_s: int
) -> tuple[list[dict], list[str]]:
    """:func:`spawn_ranks` with every request to ``endpoint`` through a counting proxy; ``args(proxy_endpoint)``
    makes the ranks' arguments. Returns the results and the requests made (``"METHOD target"``)."""
    requests: list[str] = []
    upstream = int(endpoint.split(":")[2].split("/")[0])
    with FaultProxy(upstream, on_request=lambda n, method, target: requests.append(f"{method} {target}")) as proxy:
        results = spawn_ranks(rank_main, world, args(proxy.endpoint), out, timeout_s)
    return results, requests
