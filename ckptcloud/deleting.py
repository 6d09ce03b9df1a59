"""Deleting many objects, the pipeline's one way: batch requests where the store has them, else concurrent single
deletes; every request retried, the first failure cancels the rest.

Store adapters only speak their SDK (``Store.delete`` and, for S3, ``delete_many`` over ``DeleteObjects``); the
threads and retries live here, like the part uploads' in :mod:`ckptcloud.streaming`.

Example:
    >>> from ckptcloud.stores.memory import MemoryStore
    >>> store = MemoryStore("b")
    >>> for name in ("a", "b", "c"):
    ...     store.put(f"run/{name}.pt", memoryview(b"x"), {})
    >>> delete_keys(store, ["run/a.pt", "run/b.pt", "run/gone.pt"])
    >>> [info.key for info in store.list("run/")]
    ['run/c.pt']
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store

DELETE_BATCH = 1000
"""Keys per ``delete_many`` request where the store has a batch delete (S3's ``DeleteObjects`` takes 1,000)."""

DELETE_CONCURRENCY = 8
"""Single deletes in flight at once for stores without a batch delete (GCS, Azure, local folders)."""


def has_batch_delete(store: Store) -> bool:
    """Whether ``store`` deletes several keys per request (it overrides :meth:`Store.delete_many`)."""
    return type(store).delete_many is not Store.delete_many


def delete_keys(
    store: Store, keys: Iterable[str], retry: Retry | None = None, *, max_concurrency: int = DELETE_CONCURRENCY
) -> None:
    """Delete ``keys`` (keys already gone are fine): batches of :data:`DELETE_BATCH` where the store has a batch
    delete, else up to ``max_concurrency`` single deletes at once. Each request is retried; the first failure
    cancels the requests not yet sent and is raised once those in flight have ended."""
    keys, retry = list(keys), retry or Retry()
    if has_batch_delete(store):
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            retry.call(
                lambda batch=batch: store.delete_many(batch), f"deleting {len(batch)} objects from {store.url('')}"
            )
        return
    cancel = threading.Event()

    def one(key: str) -> None:
        retry.call(lambda: store.delete(key), f"deleting {store.url(key)}", cancel)

    if len(keys) <= 1:
        for key in keys:
            one(key)
        return
    with ThreadPoolExecutor(min(max_concurrency, len(keys)), thread_name_prefix="ckptcloud-delete") as pool:
        futures = [pool.submit(one, key) for key in keys]
        try:
            for future in futures:
                future.result()
        except BaseException:
            cancel.set()
            for future in futures:
                future.cancel()
            raise
