"""``complete`` of a GCS composite upload: the compose tree, and why a compose failed when its sources are gone.

Part *n* goes to ``{dirname(key)}/.ckptcloud-tmp/{upload_id}/part-n`` (invisible to ``RemoteSaver.list``);
``complete`` composes groups of 32 (GCS's limit) into intermediates until at most 32 remain, then once into ``key``
with the metadata, so the object appears whole or not at all; the temporaries are deleted afterwards. (Composes do
not delete their own sources: a compose retried after a lost response would find them gone and fail although the
object was published.)

A part or intermediate deleted while the upload runs (another process's ``cleanup_incomplete(older_than=...)``
shorter than this save, or a lifecycle rule on ``.ckptcloud-tmp/``) makes the compose fail: GCS answers 404
(fake-gcs-server 500). That is reported as such, naming the object being saved and its temporary folder, not as a
missing bucket (review 24) nor as a transient failure to retry.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ckptcloud.errors import TransientError
from ckptcloud.stores.base import Precondition

if TYPE_CHECKING:
    from ckptcloud.stores.gcs import GCSStore, GCSUpload

logger = logging.getLogger("ckptcloud")


def compose_all(store: GCSStore, upload: GCSUpload, parts: list[str], when: Precondition | None) -> None:
    """Compose ``parts`` into ``upload.key``: intermediates first (the key appears only at the last compose), then
    delete the temporaries (a failure to delete is only logged: the object is published)."""
    from ckptcloud.stores import gcs

    sources, level, fan_in, tmp = list(parts), 0, gcs.MAX_COMPOSE_SOURCES, upload.tmp_prefix
    sources_now = sources  # the sources of the compose being sent
    try:
        while len(sources) > fan_in:
            level += 1
            groups = [sources[i : i + fan_in] for i in range(0, len(sources), fan_in)]
            done = []
            for i, group in enumerate(groups):
                sources_now = group
                done.append(store._compose(f"{tmp}compose-{level}-{i:05d}", group))
            sources = done
        sources_now = sources
        store._compose(upload.key, sources, upload.metadata, **gcs._conditions(when))
    except (FileNotFoundError, TransientError) as err:
        status = getattr(err, "gcs_status", None)
        if status == 404 or (status is not None and status >= 500):  # fake-gcs-server: 500 for a missing source
            gone = _missing(store, tmp, sources_now)
            if gone:
                raise FileNotFoundError(
                    f"cannot publish {store.url(upload.key)}: {len(gone)} of its temporary parts under "
                    f"{store.url(tmp)} (e.g. {gone[0].rpartition('/')[2]}) were deleted while the upload ran. Did "
                    f"another process run cleanup_incomplete(older_than=...) with less than this save's duration, or "
                    f"does a lifecycle rule delete objects under {gcs.TMP_FOLDER}/? Nothing was published: save again"
                ) from err
        raise
    try:  # the object is published: leftovers are garbage, not a failed save
        store.abort(upload)
    except Exception as err:
        logger.warning("could not delete parts under %s: %s", store.url(tmp), err)


def _missing(store: Any, tmp: str, sources: list[str]) -> list[str]:
    """Which of ``sources`` no longer exist (empty when that cannot be told: the listing failed too)."""
    try:
        present = {info.key for info in store.list(tmp)}
    except Exception:
        return []
    return [name for name in sources if name not in present]
