"""GCS resumable uploads (``GCSSaver(..., upload="resumable")``): one session per object, parts sent in order.

No temporary object is ever written, so nothing is billed again through soft delete or early-deletion minimums
(review 23). The price is one stream: GCS takes a session's bytes strictly in order, so ``put_part`` for part *n*
waits until part *n - 1* was accepted (the pipeline's buffers still bound memory; throughput is one connection's).

The store contract, kept:

- **atomic, with metadata**: parts are sent as non-final chunks (multiples of 256 KiB); the last part's remainder
  (under 256 KiB, copied) and the total size go in the final request, sent by ``complete``; GCS creates the object,
  with the metadata given at the start, only then.
- **conditional commits**: GCS fixes a session's precondition when the session starts and checks it when the
  upload finishes. ``begin`` reads the object's generation and starts the session on it (``ifGenerationMatch``:
  that generation, or 0 when there is none). ``complete(when)`` then publishes only if ``when`` asks for that same
  state, and raises :class:`~ckptcloud.errors.ObjectChangedError` otherwise, without sending anything: the retry
  with the generation ``head`` saw (``streaming._publish``) succeeds if the object is still what it was at the
  start, and if it changed during the upload the save fails (nothing is published; save again) rather than
  publish under a weaker condition. ``complete(None)`` also keeps the session's condition: a resumable upload never
  replaces an object that someone else replaced while it ran.
- **abort** cancels the session (``DELETE``). Sessions cannot be listed (``list_incomplete`` cannot find one left by
  a killed process); GCS discards a session a week after it started, and its bytes never appear at the key.

Retries: a request that failed without an answer leaves GCS holding an unknown number of bytes, so the next attempt
first asks (``Content-Range: bytes */*``) and sends only the rest, as GCS documents. (fake-gcs-server 1.54 finishes
the upload on that question instead; that case raises an error naming it.)

The session URL authorizes uploads to the object without credentials: ckptcloud never shows it in a repr, a
message, a log line or a chained exception (urllib3's own DEBUG log prints every request's URL, this one too).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ckptcloud.errors import ObjectChangedError, TransientError
from ckptcloud.retry import is_transient
from ckptcloud.stores import gcs_http as ops
from ckptcloud.stores.base import Precondition

CHUNK_UNIT = 256 * 1024  # GCS takes a session's non-final chunks in multiples of this
ORDER_GRACE = 10.0  # seconds part n waits for part n - 1 to be (re)sent before it gives up its turn (and is retried)

Call = Callable[..., Any]  # GCSStore._call(op, method, url, *, target, detail, ok, missing, secret_url, **kwargs)


def start_session(store: Any, key: str, metadata: Mapping[str, str]) -> ResumableUpload:
    """Start a session on the object's present state (``GCSStore.begin``): its generation, or 0 when absent."""
    try:
        condition = store.head(key).version or "0"
    except FileNotFoundError:
        condition = "0"
    resource = json.dumps({"name": key, "contentType": "application/octet-stream", "metadata": dict(metadata)})
    params = {"uploadType": "resumable", "name": key, "ifGenerationMatch": condition}
    target = store.url(key)
    response = store._upload(ops.START, target, params, resource, "application/json; charset=UTF-8")
    response.close()
    location = response.headers.get("Location")
    if not location:
        raise TransientError(f"GCS started no resumable upload session ({ops.START.doing(target)}): no Location")
    return ResumableUpload(key, location, metadata, condition, target)


def _state(generation: str) -> str:
    return "absent" if generation == "0" else f"at generation {generation}"


class ResumableUpload:
    """One resumable session: its key, metadata, precondition and progress. Thread-safe; never shows its URL."""

    def __init__(self, key: str, url: str, metadata: Mapping[str, str], condition: str, target: str) -> None:
        self.key, self.metadata, self.condition, self.target = key, dict(metadata), condition, target
        self._session = url
        self._lock = threading.Condition()
        self._next = 1  # the part whose turn it is
        self._entered: set[int] = set()  # parts inside put_part now
        self._absent_since: float | None = None
        self._failed_for_good = False  # a part failed with an error the pipeline does not retry
        self._offset = 0  # bytes GCS holds
        self._tail: bytes | None = None  # the last part's bytes past its last 256 KiB boundary
        self._unsure = False  # a request failed without an answer: ask GCS what it holds before sending
        self._status = "open"  # open, finished, cancelled

    def __repr__(self) -> str:
        return (
            f"ResumableUpload(target={self.target!r}, condition={self.condition!r}, parts_sent={self._next - 1}, "
            f"bytes_sent={self._offset}, status={self._status!r})"
        )

    # ------------------------------------------------------------------------------------------------ parts
    def put_part(self, call: Call, number: int, data: memoryview, headers: Mapping[str, str]) -> int:
        """Send part ``number`` once every earlier part was accepted; returns ``number``."""
        with self._lock:
            self._entered.add(number)  # until it returns: a later part waiting for it knows it is coming
            self._lock.notify_all()
            try:
                turn = self._wait_turn(number)
            except BaseException:
                self._entered.discard(number)
                raise
            if not turn:  # accepted already
                self._entered.discard(number)
                return number
        try:
            self._send(call, number, data, headers)
        except BaseException as err:
            with self._lock:
                self._failed_for_good = self._failed_for_good or not is_transient(err)
                self._entered.discard(number)
                self._lock.notify_all()
            raise
        with self._lock:
            self._next = number + 1
            self._entered.discard(number)
            self._lock.notify_all()
        return number

    def _wait_turn(self, number: int) -> bool:
        """Wait (holding the lock's condition) until it is part ``number``'s turn; False if it was accepted."""
        while self._next != number:
            if self._next > number:
                return False
            if self._status != "open":
                raise RuntimeError(f"the resumable upload of {self.target} was {self._status}")
            if self._failed_for_good:
                raise TransientError(f"part {number} of {self.target} waits for part {self._next}, which failed")
            now = time.monotonic()
            if self._next in self._entered:
                self._absent_since = None
            elif self._absent_since is None:
                self._absent_since = now
            elif now - self._absent_since > ORDER_GRACE:
                self._absent_since = None
                raise TransientError(
                    f"part {number} of {self.target} waited {ORDER_GRACE:g} s for part {self._next}, which is not "
                    "being sent (a resumable upload takes its parts in order)"
                )
            self._lock.wait(0.2)
        return True

    def _send(self, call: Call, number: int, data: memoryview, headers: Mapping[str, str]) -> None:
        if self._tail is not None:
            raise ValueError(f"part {number} of {self.target} follows a part shorter than a multiple of 256 KiB")
        size = len(data)
        aligned = size - size % CHUNK_UNIT
        start, end = self._offset, self._offset + aligned
        position = self._ask(call) if self._unsure else start
        if position < start:
            raise self._lost(position)
        while position < end:
            range_ = f"bytes {position}-{end - 1}/*"
            chunk = data[position - start : aligned]
            response = self._put(call, ops.CHUNK, str(number), chunk, {**headers, "Content-Range": range_}, (308,))
            if response.status_code != 308:
                raise RuntimeError(f"GCS finished the resumable upload of {self.target} before its last part")
            held = _held(response)
            if held <= position:
                self._unsure = True
                raise TransientError(f"GCS kept none of part {number} of {self.target} (it holds {held} bytes)")
            position = held
        self._offset = end
        if aligned < size:
            self._tail = bytes(data[aligned:])

    # ------------------------------------------------------------------------------------- finish and cancel
    def finish(self, call: Call, when: Precondition | None, headers: Mapping[str, str]) -> None:
        """Send the remainder and the total size: GCS creates the object now, if the session's condition holds."""
        if self._status == "finished":
            return
        if self._status == "cancelled":
            raise self._gone()
        want = None if when is None else (when.version or "0")
        if want is not None and want != self.condition:
            raise ObjectChangedError(
                f"{self.target} changed while it was uploaded: it was {_state(self.condition)} when its resumable "
                f"upload began and this commit expects it {_state(want)}. GCS keeps the precondition a resumable "
                "upload began with, so nothing was published: save again"
            )
        tail = self._tail or b""
        total = self._offset + len(tail)
        if self._unsure:
            held = self._ask(call, finishing=True)
            if self._status == "finished":
                return
            if held != self._offset:
                raise self._lost(held)
        range_ = f"bytes {self._offset}-{total - 1}/{total}" if tail else f"bytes */{total}"
        try:
            response = self._put(call, ops.FINISH, "", tail, {**headers, "Content-Range": range_}, ())
        except ObjectChangedError as err:
            raise ObjectChangedError(
                f"{self.target} changed while it was uploaded (it was {_state(self.condition)} when its resumable "
                "upload began); nothing was published: save again"
            ) from err
        if response.status_code == 308:
            self._unsure = True
            raise TransientError(f"GCS did not finish the resumable upload of {self.target}; asking again")
        self._status = "finished"

    def cancel(self, call: Call) -> None:
        """Discard the session (GCS answers 499); one already gone or finished is fine."""
        with self._lock:
            if self._status == "finished":
                return
            self._status = "cancelled"
            self._lock.notify_all()
        call(ops.CANCEL, "DELETE", self._session, target=self.target, ok=(499, 404, 410), secret_url=True)

    # ---------------------------------------------------------------------------------------------- helpers
    def _put(self, call: Call, op: ops.Operation, detail: str, body: Any, headers: dict, ok: tuple) -> Any:
        try:
            return call(
                op, "PUT", self._session, target=self.target, detail=detail, ok=ok, missing=self._gone,
                secret_url=True, data=body, headers=headers,
            )  # fmt: skip
        except (ConnectionError, TimeoutError):
            self._unsure = True  # GCS may hold some of it
            raise

    def _ask(self, call: Call, finishing: bool = False) -> int:
        """How many bytes GCS holds (after a request that got no answer)."""
        headers = {"Content-Range": "bytes */*"}
        response = self._put(call, ops.STATUS, "", b"", headers, (308,))
        self._unsure = False
        if response.status_code in (200, 201):
            size = _size(response)
            if finishing and size == self._offset + len(self._tail or b""):  # our final request's answer was lost
                self._status = "finished"
                return self._offset
            raise RuntimeError(
                f"the server finished the resumable upload of {self.target} with {size} bytes when asked how many it "
                "holds, before the last part was sent (fake-gcs-server 1.54 does this; GCS answers 308): the object "
                "there may be incomplete. Use upload='composite' with this server"
            )
        return _held(response)

    def _lost(self, held: int) -> RuntimeError:
        return RuntimeError(
            f"GCS holds {held} bytes of the resumable upload of {self.target}, fewer than the {self._offset} it had "
            "accepted; those parts are no longer in memory, so nothing was published: save again"
        )

    def _gone(self, message: str = "") -> FileNotFoundError:
        return FileNotFoundError(
            f"the resumable upload session of {self.target} no longer exists (cancelled, or older than GCS's one "
            "week); nothing was published: save again"
        )


def _size(response: Any) -> int | None:
    """The ``size`` of the object resource a finished upload answers with."""
    try:
        return int(response.json()["size"])
    except Exception:
        return None


def _held(response: Any) -> int:
    """Bytes GCS holds, from a 308's ``Range: bytes=0-N`` (none when it is absent)."""
    value = response.headers.get("Range", "")
    if not value.startswith("bytes=") or "-" not in value:
        return 0
    return int(value.rpartition("-")[2]) + 1
