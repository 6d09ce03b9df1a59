"""Faults during a sharded save (``CloudStorageWriter``, world 2, gloo, one process per rank) on S3.

Each case checks the same things:

- a rank SIGKILLed mid-save, and the server SIGKILLed mid-save: every surviving rank raises in bounded time, nothing
  is committed (no ``.metadata``), an older checkpoint in the same prefix loads bit-identical, and
  :func:`~ckptcloud.dcp.cleanup.cleanup_uncommitted` removes every leftover (data files and incomplete multipart
  uploads) while keeping the older checkpoint;
- 10 % of requests faulted by the proxy (503s, resets before and in the middle of answers, stalls): the save succeeds
  through the pipeline's retries and loads back bit-identical (the load goes through the faults too), and cleanup
  finds nothing to remove.

Ranks are plain subprocesses with a short process-group timeout; every wait is bounded. Outcomes go to the fault
report (``tests/faults/conftest.py``) and to stdout (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptcloud.testing.faultproxy import FAULTS, FaultProxy
from ckptcloud.testing.servers import free_port
from tests.faults.test_fault_injection import direct_bucket, port_of, rates, until_ready

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy on every rank (ckptcloud[dcp])")
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

WORLD = 2
ROWS, COLS = 1536, 2048  # 12 MiB of float32: each rank's 6 MiB file is a multipart upload of 2 parts (5 + 1 MiB)
PG_TIMEOUT_S = 8  # the process group's (and the ranks' agreement's) timeout: a killed rank is noticed by then
RANK_WAIT_S = 60  # every rank process is killed (and the test fails) after this

RANK = textwrap.dedent(
    """
    import json, os, signal, sys, time, traceback, warnings
    from datetime import timedelta

    rank, world, port, endpoint, url, scenario, out, pg_timeout = sys.argv[1:9]
    rank, world = int(rank), int(world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ckptcloud.dcp import CloudStorageWriter
    from ckptcloud.retry import Retry
    from ckptcloud.stores.s3 import S3Store
    from tests.faults.test_sharded_faults import full_state

    result = {"rank": rank}
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=float(pg_timeout)))
    try:
        mesh = init_device_mesh("cpu", (world,))
        state = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in full_state().items()}
        state["step"] = 2
        if scenario.startswith("kill_rank"):
            victim = int(scenario[len("kill_rank"):].split("+")[0])
            put_part, sent = S3Store.put_part, []

            def put_part_or_die(self, upload, number, data):
                if rank == victim and sent:  # one part of this rank's file is stored: die before the next
                    os.kill(os.getpid(), signal.SIGKILL)
                result_part = put_part(self, upload, number, data)
                sent.append(number)
                return result_part

            S3Store.put_part = put_part_or_die
        retry = (
            Retry(max_attempts=10, initial_backoff=0.01, max_backoff=0.2) if scenario == "faults"
            else Retry(max_attempts=3, initial_backoff=0.05, max_backoff=0.2, deadline=5)
        )
        options = dict(endpoint_url=endpoint, region_name="us-east-1", part_size=5 << 20, max_concurrency=1)
        started = time.monotonic()
        writer = None
        try:
            for one in url.split(","):  # several saves in a row: one per URL
                if scenario.endswith("+handler"):  # the save handler Checkpoint(sharded=True) calls
                    from ckptcloud import S3Saver
                    from ckptcloud.dcp.retention import ShardedSaver

                    bucket, _, key = one[len("s3://"):].partition("/")
                    prefix, _, name = key.rpartition("/")
                    saver = S3Saver(bucket, prefix, require_empty=False, retry=retry, **options)
                    ShardedSaver(saver)(state, name)
                else:
                    writer = CloudStorageWriter(one, retry=retry, **options)
                    dcp.save(state, storage_writer=writer)
                result["saved"] = result.get("saved", 0) + 1
        except BaseException as err:
            result["save_error"] = f"{type(err).__name__}: {err}"[:600]
            if writer is not None and writer.rank_failure is not None:  # hidden by gloo's error from DCP's gather
                result["rank_failure"] = f"{type(writer.rank_failure).__name__}: {writer.rank_failure}"[:600]
        result["seconds"] = round(time.monotonic() - started, 2)
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        os._exit(0)  # no process-group teardown: a peer may be dead
    """
)


def full_state() -> dict[str, torch.Tensor]:
    """The whole tensors the ranks shard by rows (the same on every rank)."""
    generator = torch.Generator().manual_seed(7)
    return {"w": torch.randn(ROWS, COLS, generator=generator), "b": torch.randn(ROWS, generator=generator)}


def run_ranks(
    endpoint: str, url: str, scenario: str, out: Path, pg_timeout: float = PG_TIMEOUT_S, **environ: str
) -> tuple[list[dict[str, Any]], list[int], float]:
    """Start the ranks, wait for all (bounded); their results (``{}`` for a rank that died), exit codes, seconds.

    ``pg_timeout`` is the process group's timeout; ``environ`` is added to the ranks' environment."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = []
    for rank in range(WORLD):
        log = open(out / f"rank{rank}.log", "wb")
        argv = [sys.executable, "-c", RANK, str(rank), str(WORLD), port, endpoint, url, scenario, str(out)]
        argv = [*argv, str(pg_timeout)]
        io = {"stdout": log, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}
        procs.append(subprocess.Popen(argv, **io, start_new_session=True, env=env, cwd=root))
        log.close()
    started = time.monotonic()
    codes: list[int] = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=max(1.0, RANK_WAIT_S - (time.monotonic() - started))))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: a rank is still running after {RANK_WAIT_S} s (a hang)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    elapsed = time.monotonic() - started
    results = []
    for rank in range(WORLD):
        path = out / f"rank{rank}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        assert "crash" not in result, result["crash"] + (out / f"rank{rank}.log").read_text(errors="replace")
        results.append(result)
    return results, codes, elapsed


def save_old(url: str, endpoint: str) -> dict[str, torch.Tensor]:
    """An older committed checkpoint (world 1) in the same prefix; returns what it holds."""
    import torch.distributed.checkpoint as dcp

    from ckptcloud.dcp import CloudStorageWriter

    old = {"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(1)), "step": 1}
    dcp.save(old, storage_writer=CloudStorageWriter(url, endpoint_url=endpoint, region_name="us-east-1"), no_dist=True)
    return old


def load(url: str, endpoint: str, like: dict[str, Any], **options: Any) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from ckptcloud.dcp import CloudStorageReader

    fresh = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in like.items()}
    reader = CloudStorageReader(url, endpoint_url=endpoint, region_name="us-east-1", **options)
    dcp.load(fresh, storage_reader=reader, no_dist=True)
    return fresh


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def store_of(endpoint: str, bucket: str) -> Any:
    from ckptcloud.dcp.target import Target

    return Target(f"s3://{bucket}/run/step-1", endpoint_url=endpoint, region_name="us-east-1").store


def leftovers(store: Any, folder: str) -> tuple[int, int]:
    """Objects in ``folder``, and incomplete multipart uploads under it."""
    objects = len(store.list(f"{folder}/"))
    uploads = store.metadata_client.list_multipart_uploads(Bucket=store.bucket, Prefix=f"{folder}/")
    return objects, len(uploads.get("Uploads", []))


def check_after_failure(store: Any, endpoint: str, bucket: str, old: dict[str, Any]) -> dict[str, Any]:
    """Nothing committed, the older checkpoint loads, cleanup removes every leftover and keeps the older one."""
    from ckptcloud.dcp import is_committed
    from ckptcloud.dcp.cleanup import cleanup_uncommitted

    assert not is_committed(store, "run/step-2"), "a failed save committed .metadata"
    assert is_committed(store, "run/step-1")
    assert same(load(f"s3://{bucket}/run/step-1", endpoint, old), old), "the older checkpoint changed"
    before = leftovers(store, "run/step-2")
    removed = cleanup_uncommitted(store, "run", older_than=0)
    after = leftovers(store, "run/step-2")
    assert removed == (["run/step-2/"] if sum(before) else []), (removed, before)
    assert after == (0, 0), f"cleanup left {after[0]} objects and {after[1]} incomplete uploads"
    assert is_committed(store, "run/step-1")
    assert same(load(f"s3://{bucket}/run/step-1", endpoint, old), old), "cleanup touched the older checkpoint"
    return {"leftover_objects": before[0], "leftover_uploads": before[1], "cleanup_removed": removed}


# ------------------------------------------------------------------------------------ a. a rank is SIGKILLed
@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0-coordinator"])
def test_a_rank_killed_mid_save_commits_nothing_the_other_rank_raises_promptly_and_cleanup_removes_the_rest(
    victim, s3_endpoint, s3_bucket, tmp_path, fault_report
):
    endpoint = s3_endpoint.url
    old = save_old(f"s3://{s3_bucket}/run/step-1", endpoint)
    store = store_of(endpoint, s3_bucket)
    results, codes, elapsed = run_ranks(endpoint, f"s3://{s3_bucket}/run/step-2", f"kill_rank{victim}", tmp_path)
    survivor = 1 - victim
    assert codes[victim] == -signal.SIGKILL and results[victim] == {}, f"rank {victim} was not killed: {codes}"
    assert "saved" not in results[survivor] and "save_error" in results[survivor], results[survivor]
    assert results[survivor]["seconds"] < 3 * PG_TIMEOUT_S, results[survivor]
    checked = check_after_failure(store, endpoint, s3_bucket, old)
    entry = {
        "test": "sharded_rank_killed", "store": "s3", "server": "moto_server", "world": WORLD, "killed_rank": victim,
        "committed": 0, "older_checkpoint_intact": True, "survivor_seconds_to_raise": results[survivor]["seconds"],
        "seconds": round(elapsed, 1), "survivor_error": results[survivor]["save_error"][:300], **checked,
    }  # fmt: skip
    fault_report.append(entry)
    print(
        f"\n[faults] sharded s3 world {WORLD}, rank {victim} SIGKILLed mid-save: rank {survivor} raised in "
        f"{entry['survivor_seconds_to_raise']} s, nothing committed, older checkpoint intact; leftovers "
        f"{checked['leftover_objects']} objects + {checked['leftover_uploads']} incomplete uploads, 0 after cleanup"
    )


# ------------------------------------------- a2. a rank is SIGKILLed, the process group's timeout at its default
DEFAULT_PG_TIMEOUT_S = 1800  # torch's default for gloo: the survivor must not wait for it
STALE_AFTER_S = 3  # the ranks' heartbeat staleness bound (CKPTCLOUD_DCP_STALE_AFTER), instead of 60 s


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0-coordinator"])
def test_a_rank_killed_mid_save_is_found_dead_by_its_heartbeat_long_before_the_process_group_timeout(
    victim, s3_endpoint, s3_bucket, tmp_path, fault_report
):
    endpoint = s3_endpoint.url
    old = save_old(f"s3://{s3_bucket}/run/step-1", endpoint)
    store = store_of(endpoint, s3_bucket)
    url = f"s3://{s3_bucket}/run/step-2"
    stale = {"CKPTCLOUD_DCP_STALE_AFTER": str(STALE_AFTER_S)}
    results, codes, elapsed = run_ranks(endpoint, url, f"kill_rank{victim}", tmp_path, DEFAULT_PG_TIMEOUT_S, **stale)
    survivor = 1 - victim
    assert codes[victim] == -signal.SIGKILL and results[victim] == {}, f"rank {victim} was not killed: {codes}"
    assert "saved" not in results[survivor] and "save_error" in results[survivor], results[survivor]
    assert results[survivor]["seconds"] < 10, results[survivor]
    # dcp.save itself raises gloo's "Connection closed by peer" from its gather right after write_data raised
    found = results[survivor].get("rank_failure", "")
    assert found.startswith("RankFailedError: ") and url in found, results[survivor]
    if victim == 1:
        assert "rank 1 showed no heartbeat for 3 s" in found, found
    checked = check_after_failure(store, endpoint, s3_bucket, old)
    entry = {
        "test": "sharded_rank_killed_default_pg_timeout", "store": "s3", "server": "moto_server", "world": WORLD,
        "killed_rank": victim, "pg_timeout_s": DEFAULT_PG_TIMEOUT_S, "stale_after_s": STALE_AFTER_S, "committed": 0,
        "survivor_seconds_to_raise": results[survivor]["seconds"], "seconds": round(elapsed, 1),
        "survivor_error": results[survivor]["save_error"][:300], "rank_failure": found[:300], **checked,
    }  # fmt: skip
    fault_report.append(entry)
    print(
        f"\n[faults] sharded s3 world {WORLD}, rank {victim} SIGKILLed mid-save, process-group timeout "
        f"{DEFAULT_PG_TIMEOUT_S} s, heartbeat bound {STALE_AFTER_S} s: rank {survivor} raised in "
        f"{entry['survivor_seconds_to_raise']} s; writer.rank_failure: {found[:200]}"
    )


def test_the_sharded_save_handler_raises_rank_failed_error_naming_the_dead_rank_not_gloos_error(
    s3_endpoint, s3_bucket, tmp_path
):
    endpoint = s3_endpoint.url
    old = save_old(f"s3://{s3_bucket}/run/step-1", endpoint)
    url = f"s3://{s3_bucket}/run/step-2"
    stale = {"CKPTCLOUD_DCP_STALE_AFTER": str(STALE_AFTER_S)}
    results, codes, _ = run_ranks(endpoint, url, "kill_rank1+handler", tmp_path, DEFAULT_PG_TIMEOUT_S, **stale)
    assert codes[1] == -signal.SIGKILL, f"rank 1 was not killed: {codes}"
    error = results[0].get("save_error", "")
    assert error.startswith("RankFailedError: ") and "rank 1" in error and url in error, results[0]
    assert results[0]["seconds"] < 10, results[0]
    check_after_failure(store_of(endpoint, s3_bucket), endpoint, s3_bucket, old)


# ------------------------------------------------------------------------------- b. the server is SIGKILLed
@pytest.mark.parametrize("kill_at", ["part3", "metadata"])
def test_the_server_killed_mid_save_commits_nothing_every_rank_raises_and_cleanup_after_restart_removes_the_rest(
    kill_at, restartable, tmp_path, fault_report
):
    """``part3``: as the 3rd of the ranks' 4 parts arrives (2 stored); ``metadata``: as the coordinator's PUT of
    ``.metadata`` arrives, every data file being stored by then (the save cannot delete them: the server is gone)."""
    server = restartable("s3")  # SeaweedFS: keeps its data, incomplete uploads included, across the kill
    bucket = direct_bucket("s3", server.endpoint)
    old = save_old(f"s3://{bucket}/run/step-1", server.endpoint)
    parts, killed = [0], []

    def kill_mid_save(number: int, method: str, target: str) -> None:
        if method != "PUT" or killed:
            return
        parts[0] += "partNumber=" in target
        if (kill_at == "part3" and parts[0] == 3) or (kill_at == "metadata" and "/run/step-2/.metadata" in target):
            killed.append(target)
            server.kill()

    with FaultProxy(server.port, seed=11, on_request=kill_mid_save) as proxy:
        results, codes, elapsed = run_ranks(proxy.endpoint, f"s3://{bucket}/run/step-2", "plain", tmp_path)
    assert killed, "the server was never killed"
    assert codes == [0, 0] and all("save_error" in r and "saved" not in r for r in results), results
    seconds = max(r["seconds"] for r in results)
    assert seconds < 30, f"a rank took {seconds} s to raise"
    server.start()
    store = store_of(server.endpoint, bucket)
    until_ready(lambda: store.list("run/"), "listing")
    deadline = time.monotonic() + 30
    while True:  # SeaweedFS answers 500 for a while after a restart, until its volumes are back
        try:
            load(f"s3://{bucket}/run/step-1", server.endpoint, old)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    checked = check_after_failure(store, server.endpoint, bucket, old)
    entry = {
        "test": "sharded_server_killed", "store": "s3", "server": server.name, "world": WORLD, "killed_at": kill_at,
        "committed": 0,
        "older_checkpoint_intact": True, "max_seconds_to_raise": seconds, "seconds": round(elapsed, 1),
        "errors": [r["save_error"][:200] for r in results], **checked,
    }  # fmt: skip
    fault_report.append(entry)
    print(
        f"\n[faults] sharded s3 ({server.name}) world {WORLD}, server SIGKILLed at {kill_at}: every rank raised "
        f"within {seconds} s, nothing committed, older checkpoint intact; leftovers {checked['leftover_objects']} "
        f"objects + {checked['leftover_uploads']} incomplete uploads, 0 after cleanup"
    )


# ------------------------------------------------------------------------------ c. 10 % of requests faulted
FAULTY_SAVES = 4


def test_sharded_saves_through_a_network_faulting_10pct_of_requests_succeed_and_load_back_bit_identical(
    s3_endpoint, s3_bucket, tmp_path, fault_report
):
    from ckptcloud.dcp import is_committed
    from ckptcloud.dcp.cleanup import cleanup_uncommitted
    from ckptcloud.retry import Retry

    old = save_old(f"s3://{s3_bucket}/run/step-1", s3_endpoint.url)
    expected = {**full_state(), "step": 2}
    folders = [f"run/step-{2 + i}" for i in range(FAULTY_SAVES)]
    failures: list[str] = []
    with FaultProxy(port_of(s3_endpoint.url), seed=10, stall_seconds=0.2) as proxy:
        proxy.set_rates(**rates(0.1))
        urls = ",".join(f"s3://{s3_bucket}/{folder}" for folder in folders)
        results, codes, elapsed = run_ranks(proxy.endpoint, urls, "faults", tmp_path)
        assert codes == [0, 0] and all(r.get("saved") == FAULTY_SAVES for r in results), results
        retry = Retry(max_attempts=10, initial_backoff=0.01, max_backoff=0.2)
        for folder in folders:  # the loads go through the faults too
            loaded = load(f"s3://{s3_bucket}/{folder}", proxy.endpoint, {**full_state(), "step": 0}, retry=retry)
            if not same(loaded, expected):
                failures.append(f"{folder}: loaded back different")
        injected = {kind: proxy.counters[kind] for kind in FAULTS}
        requests = proxy.counters["requests"]
    store = store_of(s3_endpoint.url, s3_bucket)
    committed = sum(is_committed(store, folder) for folder in folders)
    removed = cleanup_uncommitted(store, "run", older_than=0)
    uploads = sum(leftovers(store, folder)[1] for folder in folders)
    entry = {
        "test": "sharded_faulty_network", "store": "s3", "server": "moto_server", "world": WORLD, "fault_rate": 0.1,
        "saves_attempted": FAULTY_SAVES, "saves_succeeded": min(r.get("saved", 0) for r in results),
        "committed": committed, "loaded_bit_identical": FAULTY_SAVES - len(failures), "requests": requests,
        "faults_injected": injected, "incomplete_uploads_left": uploads, "cleanup_removed": removed,
        "save_seconds": max(r["seconds"] for r in results), "seconds": round(elapsed, 1), "failures": failures,
    }  # fmt: skip
    fault_report.append(entry)
    print(
        f"\n[faults] sharded s3 world {WORLD} rate=10%: saves {entry['saves_succeeded']}/{FAULTY_SAVES} ok in "
        f"{entry['save_seconds']} s, {entry['loaded_bit_identical']} loaded back bit-identical, {requests} requests, "
        f"faults {injected}, incomplete uploads left {uploads}"
    )
    assert not failures and committed == FAULTY_SAVES
    assert same(load(f"s3://{s3_bucket}/run/step-1", s3_endpoint.url, old), old)
    assert removed == [] and uploads == 0
    assert injected["error"] + injected["reset"] + injected["reset_mid"] > 0, "no fault injected: nothing proved"
