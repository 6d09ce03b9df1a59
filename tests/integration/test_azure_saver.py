"""AzureBlobSaver against a real Azurite (started by the suite, or ``CKPTCLOUD_TEST_AZURE_CONNECTION_STRING``)."""

from __future__ import annotations

import base64
import logging
import sys
import tracemalloc

import pytest
import torch
from azure.core.exceptions import ResourceNotFoundError
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint as IgniteCheckpoint

import ckptcloud
from ckptcloud import Checkpoint
from ckptcloud.retry import NO_RETRY
from ckptcloud.savers import AzureBlobSaver
from ckptcloud.stores.azure import READ_CHUNK_SIZE, AzureBlobStore
from ckptcloud.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY
from tests.conftest import AZURITE_API_VERSION
from tests.helpers import stored_bytes, torch_bytes

MiB = 1024 * 1024
pytestmark = pytest.mark.integration
WRONG_KEY = base64.b64encode(b"not-the-azurite-key-0123456789-" * 2).decode()


@pytest.fixture
def client(azure_service, azure_container):
    return azure_service.get_container_client(azure_container)


def blob_endpoint(connection_string: str) -> str:
    fields = dict(part.split("=", 1) for part in connection_string.split(";") if part)
    return fields["BlobEndpoint"].rstrip("/")


def names(client) -> list[str]:
    return sorted(b.name for b in client.list_blobs())


def blob_bytes(client, name: str) -> bytes:
    return client.download_blob(name).readall()


def uncommitted_ids(client, name: str) -> list[str]:
    try:
        return [b.id for b in client.get_blob_client(name).get_block_list("uncommitted")[1]]
    except ResourceNotFoundError:  # no blob and no staged blocks under that name
        return []


def training_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "nested": {"text": "hi", "n": [1, (2, 3)]}}


@pytest.mark.parametrize(
    "make_state,part_size",
    [
        (training_state, 1 * MiB),  # a few KiB: one Put Blob
        (lambda: {"w": torch.randn(3 * MiB)}, 5 * MiB),  # 12 MiB: three blocks, the last one short
        (lambda: {"w": torch.randn(5 * MiB // 4)}, 5 * MiB),  # just over one block after the zip header
        (lambda: {f"layer{i}": torch.randn(4 * MiB) for i in range(4)}, 8 * MiB),  # 64 MiB: 9 blocks
    ],
    ids=["single-put", "12MiB-short-last-block", "one-block-plus", "64MiB"],
)
def test_round_trip_is_bit_identical(client, azure_container, make_state, part_size):
    state = make_state()
    saver = AzureBlobSaver(azure_container, "run", container_client=client, part_size=part_size, max_concurrency=4)
    saver(state, "ckpt.pt")
    assert blob_bytes(client, "run/ckpt.pt") == stored_bytes(state)
    assert torch_bytes(saver.load("ckpt.pt")) == torch_bytes(state)
    assert saver.list() == ["ckpt.pt"]


def test_small_checkpoint_is_one_put_request(client, azure_container, monkeypatch):
    calls: list[str] = []
    for name in ("put", "begin", "put_part", "complete"):
        original = getattr(AzureBlobStore, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(AzureBlobStore, name, spy)
    AzureBlobSaver(azure_container, container_client=client)({"w": torch.ones(10)}, "tiny.pt")
    assert calls == ["put"]
    assert names(client) == ["tiny.pt"]


def test_block_ids_have_equal_length_and_one_random_upload_id_per_save(client, azure_container):
    saver = AzureBlobSaver(azure_container, container_client=client, part_size=1 * MiB, max_concurrency=8)
    state = {"w": torch.randn(3 * MiB)}  # 12 MiB: 12 full blocks and a short 13th
    prefixes = []
    for _ in range(2):
        saver(state, "same.pt")
        ids = [b.id for b in client.get_blob_client("same.pt").get_block_list("committed")[0]]
        assert len(ids) == 13
        assert len({len(i) for i in ids}) == 1
        upload_ids = {i.rsplit("-", 1)[0] for i in ids}
        assert len(upload_ids) == 1
        assert [int(i.rsplit("-", 1)[1]) for i in ids] == list(range(1, 14))
        prefixes.append(upload_ids.pop())
    assert prefixes[0] != prefixes[1]
    assert blob_bytes(client, "same.pt") == stored_bytes(state)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_after_k_blocks_commits_nothing_and_keeps_the_previous_blob(
    client, azure_container, monkeypatch, k, exc
):
    saver = AzureBlobSaver(azure_container, "p", container_client=client, part_size=1 * MiB, max_concurrency=2)
    old = {"w": torch.randn(3 * MiB)}
    saver(old, "old.pt")
    saver(old, "same.pt")
    old_bytes = blob_bytes(client, "p/same.pt")
    old_etag = client.get_blob_client("p/same.pt").get_blob_properties().etag

    original = AzureBlobStore.put_part

    def flaky(self, upload, number, data):
        if number > k:
            raise exc(f"injected after {k} blocks")
        return original(self, upload, number, data)

    monkeypatch.setattr(AzureBlobStore, "put_part", flaky)
    big = {"w": torch.randn(2 * MiB)}  # 8 MiB: 9 blocks
    with pytest.raises(exc, match="injected"):
        saver(big, "new.pt")
    with pytest.raises(exc, match="injected"):
        saver(big, "same.pt")  # a failed overwrite keeps the committed blob
    assert names(client) == ["p/old.pt", "p/same.pt"]
    assert blob_bytes(client, "p/same.pt") == old_bytes
    assert client.get_blob_client("p/same.pt").get_blob_properties().etag == old_etag
    with pytest.raises(FileNotFoundError, match=f"az://{azure_container}/p/new.pt"):
        saver.load("new.pt")
    assert torch_bytes(saver.load("old.pt")) == torch_bytes(old)


def test_abandoned_blocks_stay_invisible_and_never_mix_into_a_later_save(client, azure_container, monkeypatch):
    saver = AzureBlobSaver(
        azure_container, container_client=client, part_size=1 * MiB, max_concurrency=2, retry=NO_RETRY
    )
    original = AzureBlobStore.put_part

    def flaky(self, upload, number, data):
        if number > 2:
            raise ConnectionError("network down")
        return original(self, upload, number, data)

    monkeypatch.setattr(AzureBlobStore, "put_part", flaky)
    with pytest.raises(ConnectionError):
        saver({"w": torch.randn(2 * MiB)}, "x.pt")
    assert names(client) == [] and saver.list() == []
    assert uncommitted_ids(client, "x.pt")  # blocks were staged: invisible, left for Azure to collect
    monkeypatch.undo()

    state = {"w": torch.randn(2 * MiB)}
    saver(state, "x.pt")
    assert blob_bytes(client, "x.pt") == stored_bytes(state)
    assert uncommitted_ids(client, "x.pt") == []  # the commit dropped the abandoned blocks


def test_block_upload_sends_the_part_without_copying_it(client, azure_container):
    store = AzureBlobStore(client)
    buffer = bytearray(16 * MiB)
    upload = store.begin("nocopy.bin", {})
    tracemalloc.start()
    try:
        tokens = [store.put_part(upload, 1, memoryview(buffer)), store.put_part(upload, 2, memoryview(buffer)[:MiB])]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    store.complete(upload, tokens)
    assert peak < 2 * MiB, f"staging 16 MiB + 1 MiB allocated {peak / MiB:.1f} MiB in Python"
    assert store.head("nocopy.bin").size == 17 * MiB


def test_reads_stream_in_bounded_chunks_and_honour_ranges(azure_endpoint, client, azure_container):
    saver = AzureBlobSaver(
        azure_container, connection_string=azure_endpoint.url, api_version=AZURITE_API_VERSION, part_size=8 * MiB
    )
    saver({"w": torch.randn(5 * MiB)}, "big.pt")  # 20 MiB
    data = blob_bytes(client, "big.pt")
    chunks = list(saver.store.read("big.pt"))
    assert b"".join(chunks) == data and max(map(len, chunks)) <= READ_CHUNK_SIZE
    assert b"".join(saver.store.read("big.pt", 3 * MiB + 5, 9 * MiB + 7)) == data[3 * MiB + 5 : 9 * MiB + 7]
    assert b"".join(saver.store.read("big.pt", 10, 10)) == b""


def test_metadata_keys_are_identifiers_in_azure_and_dashed_in_listings(client, azure_container):
    saver = AzureBlobSaver(azure_container, container_client=client, part_size=1 * MiB)
    ckpt = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver, n_saved=1, score_name="acc")
    ckpt.save(global_step=1, score=0.25)
    name = "model_1_acc=0.2500.pt"
    raw = client.get_blob_client(name).get_blob_properties().metadata
    assert raw and all("-" not in k for k in raw)
    (info,) = saver.store.list("")
    assert info.key == name and info.size > 0 and info.last_modified is not None
    assert info.metadata["ckptcloud_priority"] == repr(0.25)
    assert info.metadata["ckptcloud_score_name"] == "acc"


def test_missing_container_is_named_at_construction(azure_endpoint):
    with pytest.raises(FileNotFoundError, match="no-such-container-here"):
        AzureBlobSaver("no-such-container-here", connection_string=azure_endpoint.url, api_version=AZURITE_API_VERSION)


def test_missing_blob_on_load_names_the_az_url(client, azure_container):
    saver = AzureBlobSaver(azure_container, "p", container_client=client)
    with pytest.raises(FileNotFoundError, match=f"az://{azure_container}/p/absent.pt"):
        saver.load("absent.pt")


def test_wrong_account_key_is_permission_error_that_never_shows_the_key(azure_endpoint, azure_container, caplog):
    if AZURITE_KEY not in azure_endpoint.url:
        pytest.skip("needs Azurite's well-known key to make a wrong one")
    caplog.set_level(logging.DEBUG, logger="ckptcloud")
    wrong = azure_endpoint.url.replace(AZURITE_KEY, WRONG_KEY)
    with pytest.raises(PermissionError) as from_string:
        AzureBlobSaver(azure_container, "p", connection_string=wrong)
    credential = {"account_name": AZURITE_ACCOUNT, "account_key": WRONG_KEY}
    with pytest.raises(PermissionError) as from_url:
        AzureBlobSaver(azure_container, account_url=blob_endpoint(azure_endpoint.url), credential=credential)
    saver = AzureBlobSaver(azure_container, "p", connection_string=wrong, save_on_rank=1)  # no request made
    assert "access denied" in str(from_string.value) and azure_container in str(from_string.value)
    shown = [str(from_string.value), repr(from_string.value), str(from_url.value), caplog.text, repr(saver)]
    shown += [str(from_string.value.__cause__), str(from_url.value.__cause__)]  # the SDK's chained errors too
    for text in shown:
        assert WRONG_KEY not in text and AZURITE_KEY not in text


def test_require_empty_refuses_a_prefix_with_checkpoints(client, azure_container):
    client.upload_blob("run/model_1.pt", b"x")
    with pytest.raises(ValueError, match=r"model_1\.pt.*require_empty=False"):
        AzureBlobSaver(azure_container, "run", container_client=client)
    assert AzureBlobSaver(azure_container, "run", container_client=client, require_empty=False).list() == ["model_1.pt"]
    AzureBlobSaver(azure_container, "other-run", container_client=client)


def test_ignite_checkpoint_on_an_engine_leaves_exactly_n_saved_blobs(client, azure_container):
    trainer = Engine(lambda engine, batch: None)
    saver = AzureBlobSaver(azure_container, "ignite", container_client=client)
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, IgniteCheckpoint({"model": torch.nn.Linear(2, 2)}, saver, n_saved=2)
    )
    trainer.run([0, 1, 2], max_epochs=5)
    assert names(client) == ["ignite/model_12.pt", "ignite/model_15.pt"]


def test_checkpoint_url_and_load_objects_url(azure_endpoint, client, azure_container, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure_endpoint.url)
    monkeypatch.setenv("AZURE_STORAGE_API_VERSION", AZURITE_API_VERSION)
    model = torch.nn.Linear(3, 3)
    ckpt = Checkpoint({"model": model}, f"az://{azure_container}/via-url", n_saved=1)
    ckpt.save(global_step=7)
    assert names(client) == ["via-url/model_7.pt"]
    fresh = torch.nn.Linear(3, 3)
    Checkpoint.load_objects({"model": fresh}, f"az://{azure_container}/via-url/model_7.pt")
    assert torch_bytes(fresh.state_dict()) == torch_bytes(model.state_dict())
    saver = ckptcloud.saver_from_url(f"az://{azure_container}/via-url", require_empty=False)
    assert saver.list() == ["model_7.pt"] and saver.url("model_7.pt") == f"az://{azure_container}/via-url/model_7.pt"
    assert saver.store.client.api_version == AZURITE_API_VERSION


def test_remove_is_idempotent_and_listing_sees_only_the_prefix(client, azure_container):
    client.upload_blob("other/x.pt", b"not ours")
    client.upload_blob("mine-not/y.pt", b"not ours")
    saver = AzureBlobSaver(azure_container, "mine", container_client=client)
    saver({"w": torch.ones(1)}, "a.pt")
    saver({"w": torch.ones(1)}, "b.pt")
    client.upload_blob("mine/sub/c.pt", b"nested, not listed")
    assert saver.list() == ["a.pt", "b.pt"]
    saver.remove("a.pt")
    saver.remove("a.pt")
    assert saver.list() == ["b.pt"]
    assert "other/x.pt" in names(client)


def test_many_blocks_in_flight_reuse_pooled_connections(azure_endpoint, azure_container, caplog):
    caplog.set_level(logging.WARNING, logger="urllib3")
    saver = AzureBlobSaver(
        azure_container,
        connection_string=azure_endpoint.url,
        api_version=AZURITE_API_VERSION,
        part_size=1 * MiB,
        max_concurrency=24,
    )
    state = {"w": torch.randn(12 * MiB)}  # 48 MiB: 49 blocks, 24 at a time
    saver(state, "wide.pt")
    assert torch_bytes(saver.load("wide.pt")) == torch_bytes(state)
    assert "Connection pool is full" not in caplog.text


def test_client_comes_from_arguments_then_environment_or_a_named_error(azure_endpoint, azure_container, monkeypatch):
    if AZURITE_KEY not in azure_endpoint.url:
        pytest.skip("signs requests with Azurite's well-known key")
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_URL", "AZURE_STORAGE_ACCOUNT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"`connection_string` or `account_url`.*AZURE_STORAGE_CONNECTION_STRING"):
        AzureBlobSaver(azure_container)
    account_url = blob_endpoint(azure_endpoint.url)
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # as if azure-identity were not installed
    with pytest.raises(ImportError, match=r"credential=.*azure-identity"):
        AzureBlobSaver(azure_container, account_url=account_url)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", "someaccount")
    with pytest.raises(ImportError, match=r"credential=.*azure-identity"):
        AzureBlobSaver(azure_container)
    credential = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY}
    saver = AzureBlobSaver(azure_container, "k", account_url=account_url, credential=credential)
    saver({"w": torch.ones(2)}, "a.pt")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure_endpoint.url)
    assert AzureBlobSaver(azure_container, "k", require_empty=False).list() == ["a.pt"]


def test_container_client_for_another_container_is_refused(client, azure_container):
    with pytest.raises(ValueError, match="`container_client`"):
        AzureBlobSaver("some-other-container", container_client=client)


def test_missing_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.storage.blob", None)
    with pytest.raises(ImportError, match=r"pip install ckptcloud\[azure\]"):
        AzureBlobSaver("anything", connection_string="UseDevelopmentStorage=true")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"part_size": MiB - 1}, "`part_size` should be between 1048576 and 4194304000 bytes for az://"),
        ({"max_concurrency": 0}, "`max_concurrency` should be between 1 and 64, but given 0"),
        ({"prefix": "a/../b"}, "`prefix`"),
    ],
)
def test_out_of_range_arguments_are_named(client, azure_container, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AzureBlobSaver(azure_container, container_client=client, **kwargs)
