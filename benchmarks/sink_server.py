"""A minimal S3-compatible server that is fast enough not to be the bottleneck: the clients' own ceiling.

On loopback, SeaweedFS spends ~12 CPU-s per GiB, so on 2 cores it sets every client's pace. This server does no
per-byte Python work: bodies are read with ``readinto`` straight into preallocated ``bytearray``s (one per part),
objects are kept in RAM as a list of those segments (no join on complete), and GETs send ``memoryview`` slices of
them (``sendall``, no copy in Python). ``discard=True`` keeps only each object's size and CRC32C (computed by the
``crc32c`` package with the GIL released) and serves zeros: a pure upload ceiling.

Path-style S3, no auth (signatures are ignored): CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation,
PutObject, CreateMultipartUpload, UploadPart, CompleteMultipartUpload, AbortMultipartUpload,
ListMultipartUploads, CopyObject, HeadObject, GetObject (with ``Range`` and ``If-Match``), ListObjectsV2, DeleteObject,
DeleteObjects; ``If-None-Match: *`` / ``If-Match`` on PutObject and CompleteMultipartUpload. Enough for boto3,
ckptcloud's ``S3Saver``, s3torchconnector's ``S3Checkpoint`` (AWS CRT) and its DCP ``S3StorageWriter``/``Reader``.

Client quirks handled:

- ``Content-Encoding: aws-chunked`` (the CRT, and botocore with flexible checksums): the body is
  ``<hex size>[;chunk-signature=...]\\r\\n<data>\\r\\n ... 0\\r\\n<trailers>\\r\\n\\r\\n``, and
  ``x-amz-decoded-content-length`` is the object's length; trailers (``x-amz-checksum-crc32c: ...``) are read and
  dropped. ``Transfer-Encoding: chunked`` bodies are decoded the same way.
- ``Expect: 100-continue`` (boto3 on every upload with a body): answered by ``http.server`` before the body is read
  (it needs ``protocol_version = "HTTP/1.1"``, which also gives keep-alive).
- Checksum headers (``x-amz-checksum-crc32c``, ``x-amz-sdk-checksum-algorithm``) are accepted and not checked:
  the clients' checksum cost is what is measured, not the server's.
- Every response carries ``Content-Length`` (the CRT refuses keep-alive responses without it), and a request whose
  body was not read closes its connection.

Library: ``endpoint, stop = start_sink()`` starts it in a separate process (its CPU is not the client's);
``stop()`` ends it by its PID (``stop.pid``). Command line: ``python benchmarks/sink_server.py --port 9000``;
``--selftest`` measures its own throughput with raw sockets (PUT and GET of 1 GiB over 4 connections).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

MiB = 1024 * 1024
SOCKET_BUFFER = 4 * MiB
ZEROS = bytes(8 * MiB)  # what GETs send in discard mode
_NS = "http://s3.amazonaws.com/doc/2006-03-01/"

try:
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - the checksum is informational only
    import zlib

    _crc32c = zlib.crc32


class Obj:
    """One stored object: its segments (``bytearray``s, or sizes only in discard mode), metadata and ETag."""

    __slots__ = ("crc", "etag", "meta", "modified", "segments", "size")

    def __init__(self, segments: list, size: int, meta: dict[str, str], etag: str, crc: int | None) -> None:
        self.segments, self.size, self.meta, self.etag, self.crc = segments, size, meta, etag, crc
        self.modified = time.time()

    def views(self, start: int, end: int) -> Iterator[memoryview | bytes]:
        """The bytes ``[start, end)`` as views of the segments (zeros in discard mode)."""
        offset = 0
        for seg in self.segments:
            n = seg if isinstance(seg, int) else len(seg)
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi:
                if isinstance(seg, int):
                    left = hi - lo
                    while left:
                        take = min(left, len(ZEROS))
                        yield memoryview(ZEROS)[:take]
                        left -= take
                else:
                    yield memoryview(seg)[lo - offset : hi - offset]
            offset += n
            if offset >= end:
                break


class Upload:
    """A multipart upload in progress."""

    __slots__ = ("key", "meta", "parts")

    def __init__(self, key: str, meta: dict[str, str]) -> None:
        self.key, self.meta, self.parts = key, meta, {}


class State:
    """All buckets, objects and uploads, behind one lock (held only for dict updates, never during I/O)."""

    def __init__(self, discard: bool) -> None:
        self.discard = discard
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[str, Obj]] = {}
        self.uploads: dict[str, tuple[str, Upload]] = {}


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(code)
        self.status, self.code, self.message = status, code, message or code


def _etag(parts: list[bytes] | None = None) -> str:
    """A random MD5-shaped ETag for a single put or part; for a multipart object, S3's MD5-of-MD5s ``-N`` form."""
    if parts is None:
        return '"' + uuid.uuid4().hex + '"'
    digest = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return f'"{digest}-{len(parts)}"'


def _segment(size: int) -> bytearray | mmap.mmap:
    """Memory for ``size`` body bytes. Large ones are anonymous maps populated in one system call
    (``MAP_POPULATE``): ``bytearray(n)`` zero-fills under the GIL and then faults each 4 KiB page in on the first
    write, measured here at ~0.6 CPU-s per GiB against ~0.35 for the populated map."""
    if size < 1 * MiB or not hasattr(mmap, "MAP_POPULATE"):
        return bytearray(size)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    return mmap.mmap(-1, size, flags=flags)


def _http_date(when: float) -> str:
    return formatdate(when, usegmt=True)


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(when))


class Handler(BaseHTTPRequestHandler):
    """One connection; requests are handled one after another (keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "ckptcloud-sink"
    sys_version = ""
    state: State  # set on the class by make_server

    def setup(self) -> None:
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self._scratch: bytearray | None = None  # discard mode: one receive buffer per connection

    def log_message(self, format: str, *args: object) -> None:
        pass

    # ----------------------------------------------------------------------------------------- dispatch
    def _route(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _handle(self, method: str) -> None:
        self._body_read = "content-length" not in self.headers and "transfer-encoding" not in self.headers
        try:
            bucket, key, query = self._route()
            getattr(self, f"_{method.lower()}")(bucket, key, query)
        except S3Error as err:
            body = b"" if method == "HEAD" else _error_xml(err)
            self._reply(err.status, body, {"Content-Type": "application/xml"})
        if not self._body_read:
            self.close_connection = True

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ------------------------------------------------------------------------------------------ replies
    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: int = -1) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length < 0 else length))
        self.send_header("x-amz-request-id", "0")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _xml(self, root: str, inner: str) -> None:
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{_NS}">{inner}</{root}>'.encode()
        self._reply(200, body, {"Content-Type": "application/xml"})

    # -------------------------------------------------------------------------------------------- bodies
    def _read_exact(self, view: memoryview) -> None:
        got, total, rfile = 0, len(view), self.rfile
        while got < total:
            n = rfile.readinto(view[got:])
            if not n:
                raise ConnectionError("client closed the connection mid-body")
            got += n

    def _body_size(self) -> int:
        """The decoded length of the request body (``x-amz-decoded-content-length`` for aws-chunked)."""
        decoded = self.headers.get("x-amz-decoded-content-length")
        if decoded is not None:
            return int(decoded)
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            return -1
        return int(self.headers.get("Content-Length", "0"))

    def _chunked(self) -> bool:
        return "aws-chunked" in self.headers.get("Content-Encoding", "") or "chunked" in self.headers.get(
            "Transfer-Encoding", ""
        )

    def _receive(self, into: memoryview | None) -> tuple[int, int | None]:
        """Read the body into ``into`` (or, when it is ``None``, into a scratch buffer, keeping its CRC32C).

        Returns (bytes, crc or None). Decodes aws-chunked / chunked framing; trailers are read and dropped.
        """
        self._body_read = True
        crc: int | None = None if into is not None else 0
        if not self._chunked():
            n = int(self.headers.get("Content-Length", "0"))
            if into is not None:
                self._read_exact(into[:n])
            else:
                crc = self._discard(n, 0)
            return n, crc
        got = 0
        while True:
            line = self.rfile.readline(4096)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(4096) not in (b"\r\n", b"\n", b""):
                    pass  # trailers (x-amz-checksum-crc32c: ...), then the empty line
                return got, crc
            if into is not None:
                self._read_exact(into[got : got + size])
            else:
                crc = self._discard(size, crc or 0)
            got += size
            self.rfile.readline(4096)  # the CRLF after the chunk's data

    def _discard(self, n: int, crc: int | None = None) -> int | None:
        """Read ``n`` bytes into a scratch buffer and drop them; with a ``crc``, return it updated with them."""
        if self._scratch is None:
            self._scratch = bytearray(8 * MiB)
        scratch = memoryview(self._scratch)
        while n:
            take = min(n, len(scratch))
            self._read_exact(scratch[:take])
            if crc is not None:
                crc = _crc32c(scratch[:take], crc)
            n -= take
        return crc

    def _take_body(self) -> tuple[bytearray | mmap.mmap | int, int | None]:
        """The body as a stored segment: a bytearray, or its size in discard mode (with its CRC32C)."""
        size = self._body_size()
        if self.state.discard:
            n, crc = self._receive(None)
            return n, crc
        if size < 0:  # chunked without a declared length: collect the chunks (rare; boto3 and the CRT declare it)
            return self._receive_unknown(), None
        buf = _segment(size)
        n, _ = self._receive(memoryview(buf))
        if n != size:
            raise S3Error(400, "IncompleteBody", f"declared {size} bytes, got {n}")
        return buf, None

    def _receive_unknown(self) -> bytearray:
        out = bytearray()
        self._body_read = True
        while True:
            size = int(self.rfile.readline(4096).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(4096) not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += self.rfile.read(size)
            self.rfile.readline(4096)

    def _small_body(self) -> bytes:
        """A small (XML) body, decoded."""
        size = self._body_size()
        if size < 0:
            return bytes(self._receive_unknown())
        buf = bytearray(size)
        self._receive(memoryview(buf))
        return bytes(buf)

    def _drain(self) -> None:
        if not self._body_read:
            size = self._body_size()
            if size < 0:
                self._receive_unknown()
            elif self._chunked():
                self._small_body()
            else:
                self._discard(size)
                self._body_read = True

    # ------------------------------------------------------------------------------------------- helpers
    def _bucket(self, name: str) -> dict[str, Obj]:
        bucket = self.state.buckets.get(name)
        if bucket is None:
            raise S3Error(404, "NoSuchBucket", f"the bucket {name} does not exist")
        return bucket

    def _meta(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-amz-meta-")}

    def _check_write(self, bucket: dict[str, Obj], key: str) -> None:
        """``If-None-Match: *`` (create only) and ``If-Match: <ETag>`` on writes."""
        existing = bucket.get(key)
        if self.headers.get("If-None-Match") == "*" and existing is not None:
            raise S3Error(412, "PreconditionFailed", "an object is already there")
        match = self.headers.get("If-Match")
        if match is not None and (existing is None or existing.etag != match):
            raise S3Error(404 if existing is None else 412, "NoSuchKey" if existing is None else "PreconditionFailed")

    def _object(self, bucket_name: str, key: str) -> Obj:
        obj = self._bucket(bucket_name).get(key)
        if obj is None:
            raise S3Error(404, "NoSuchKey", f"no object at {key}")
        return obj

    def _object_headers(self, obj: Obj) -> dict[str, str]:
        headers = {
            "ETag": obj.etag,
            "Last-Modified": _http_date(obj.modified),
            "Content-Type": "binary/octet-stream",
            "Accept-Ranges": "bytes",
        }
        headers.update(obj.meta)
        return headers

    # -------------------------------------------------------------------------------------------- verbs
    def _put(self, bucket_name: str, key: str, query: dict[str, list[str]]) -> None:
        if not key:  # CreateBucket
            self._drain()
            with self.state.lock:
                self.state.buckets.setdefault(bucket_name, {})
            self._reply(200, headers={"Location": f"/{bucket_name}"})
            return
        bucket = self._bucket(bucket_name)
        if "uploadId" in query:  # UploadPart
            upload_id = query["uploadId"][0]
            entry = self.state.uploads.get(upload_id)
            if entry is None:
                self._drain()
                raise S3Error(404, "NoSuchUpload", "the upload does not exist")
            number = int(query["partNumber"][0])
            segment, _ = self._take_body()
            etag = _etag()
            with self.state.lock:
                entry[1].parts[number] = (segment, etag)
            self._reply(200, headers={"ETag": etag})
            return
        if "x-amz-copy-source" in self.headers:  # CopyObject (DCP's rename of .metadata): shares the segments
            self._drain()
            source = unquote(self.headers["x-amz-copy-source"].split("?", 1)[0]).lstrip("/")
            src_bucket, _, src_key = source.partition("/")
            src = self._object(src_bucket, src_key)
            with self.state.lock:
                self._check_write(bucket, key)
                obj = Obj(src.segments, src.size, dict(src.meta), src.etag, src.crc)
                bucket[key] = obj
            inner = f"<LastModified>{_iso(obj.modified)}</LastModified><ETag>{escape(obj.etag)}</ETag>"
            self._xml("CopyObjectResult", inner)
            return
        segment, crc = self._take_body()  # PutObject
        with self.state.lock:
            self._check_write(bucket, key)
            size = segment if isinstance(segment, int) else len(segment)
            obj = Obj([segment], size, self._meta(), _etag(), crc)
            bucket[key] = obj
        self._reply(200, headers={"ETag": obj.etag})

    def _post(self, bucket_name: str, key: str, query: dict[str, list[str]]) -> None:
        bucket = self._bucket(bucket_name)
        if "delete" in query:  # DeleteObjects
            root = ElementTree.fromstring(self._small_body())
            keys = [el.text or "" for el in root.iter() if el.tag.split("}")[-1] == "Key"]
            quiet = any(el.tag.split("}")[-1] == "Quiet" and (el.text or "").lower() == "true" for el in root.iter())
            with self.state.lock:
                for k in keys:
                    bucket.pop(k, None)
            inner = "" if quiet else "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
            self._xml("DeleteResult", inner)
            return
        if "uploads" in query:  # CreateMultipartUpload
            self._drain()
            upload_id = uuid.uuid4().hex
            with self.state.lock:
                self.state.uploads[upload_id] = (bucket_name, Upload(key, self._meta()))
            inner = f"<Bucket>{escape(bucket_name)}</Bucket><Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId>"
            self._xml("InitiateMultipartUploadResult", inner)
            return
        if "uploadId" in query:  # CompleteMultipartUpload
            upload_id = query["uploadId"][0]
            root = ElementTree.fromstring(self._small_body())
            numbers = [
                int(el.text or "0") for el in root.iter() if el.tag.split("}")[-1] == "PartNumber"
            ]  # the parts named, in order
            with self.state.lock:
                entry = self.state.uploads.get(upload_id)
                if entry is None:
                    raise S3Error(404, "NoSuchUpload", "the upload does not exist")
                upload = entry[1]
                missing = [n for n in numbers if n not in upload.parts]
                if missing:
                    raise S3Error(400, "InvalidPart", f"parts {missing} were not uploaded")
                self._check_write(bucket, key)
                segments = [upload.parts[n][0] for n in numbers]
                digests = [bytes.fromhex(upload.parts[n][1].strip('"')) for n in numbers]
                size = sum(s if isinstance(s, int) else len(s) for s in segments)
                obj = Obj(segments, size, upload.meta, _etag(digests), None)
                bucket[key] = obj
                del self.state.uploads[upload_id]
            inner = (
                f"<Location>/{escape(bucket_name)}/{escape(key)}</Location><Bucket>{escape(bucket_name)}</Bucket>"
                f"<Key>{escape(key)}</Key><ETag>{escape(obj.etag)}</ETag>"
            )
            self._xml("CompleteMultipartUploadResult", inner)
            return
        self._drain()
        raise S3Error(501, "NotImplemented", f"POST {self.path}")

    def _delete(self, bucket_name: str, key: str, query: dict[str, list[str]]) -> None:
        self._drain()
        if not key:  # DeleteBucket
            with self.state.lock:
                self.state.buckets.pop(bucket_name, None)
            self._reply(204)
            return
        bucket = self._bucket(bucket_name)
        with self.state.lock:
            if "uploadId" in query:  # AbortMultipartUpload
                if self.state.uploads.pop(query["uploadId"][0], None) is None:
                    raise S3Error(404, "NoSuchUpload", "the upload does not exist")
            else:
                bucket.pop(key, None)
        self._reply(204)

    def _head(self, bucket_name: str, key: str, query: dict[str, list[str]]) -> None:
        self._drain()
        if not key:  # HeadBucket
            self._bucket(bucket_name)
            self._reply(200, headers={"x-amz-bucket-region": "us-east-1"})
            return
        obj = self._object(bucket_name, key)
        self._reply(200, headers=self._object_headers(obj), length=obj.size)

    def _get(self, bucket_name: str, key: str, query: dict[str, list[str]]) -> None:
        self._drain()
        if not key:
            self._bucket_get(bucket_name, query)
            return
        obj = self._object(bucket_name, key)
        match = self.headers.get("If-Match")
        if match is not None and match != obj.etag:
            raise S3Error(412, "PreconditionFailed", "the object's ETag is not the one given")
        start, end, status = 0, obj.size, 200
        headers = self._object_headers(obj)
        spec = self.headers.get("Range")
        if spec and spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            if first:
                start, end = int(first), (int(last) + 1 if last else obj.size)
            else:  # a suffix: the last N bytes
                start, end = max(0, obj.size - int(last)), obj.size
            end = min(end, obj.size)
            if start >= obj.size and obj.size:
                headers = {"Content-Range": f"bytes */{obj.size}"}
                raise S3Error(416, "InvalidRange", "the range is past the end of the object")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{max(start, end - 1)}/{obj.size}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        for view in obj.views(start, end):
            self.wfile.write(view)

    def _bucket_get(self, bucket_name: str, query: dict[str, list[str]]) -> None:
        if "location" in query:
            self._bucket(bucket_name)
            self._xml("LocationConstraint", "")
            return
        if "uploads" in query:  # ListMultipartUploads
            prefix = query.get("prefix", [""])[0]
            with self.state.lock:
                uploads = [(i, u) for i, (b, u) in self.state.uploads.items() if b == bucket_name]
            rows = "".join(
                f"<Upload><Key>{escape(u.key)}</Key><UploadId>{i}</UploadId>"
                f"<Initiated>{_iso(time.time())}</Initiated></Upload>"
                for i, u in uploads
                if u.key.startswith(prefix)
            )
            self._xml("ListMultipartUploadsResult", f"<Bucket>{escape(bucket_name)}</Bucket>{rows}")
            return
        self._list_v2(bucket_name, query)

    def _list_v2(self, bucket_name: str, query: dict[str, list[str]]) -> None:
        bucket = self._bucket(bucket_name)
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        max_keys = int(query.get("max-keys", ["1000"])[0])
        after = query.get("continuation-token", query.get("start-after", [""]))[0]
        with self.state.lock:
            keys = sorted(k for k in bucket if k.startswith(prefix) and k > after)
        rows: list[str] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        for k in keys:
            if len(rows) + len(prefixes) >= max_keys:
                truncated = True
                break
            if delimiter:
                cut = k.find(delimiter, len(prefix))
                if cut >= 0:
                    common = k[: cut + len(delimiter)]
                    if not prefixes or prefixes[-1] != common:
                        prefixes.append(common)
                    last = k
                    continue
            obj = bucket.get(k)
            if obj is None:
                continue
            rows.append(
                f"<Contents><Key>{escape(k)}</Key><LastModified>{_iso(obj.modified)}</LastModified>"
                f"<ETag>{escape(obj.etag)}</ETag><Size>{obj.size}</Size><StorageClass>STANDARD</StorageClass>"
                "</Contents>"
            )
            last = k
        inner = (
            f"<Name>{escape(bucket_name)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(rows)}</KeyCount>"
            f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
            + "".join(rows)
            + "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        )
        if delimiter:
            inner += f"<Delimiter>{escape(delimiter)}</Delimiter>"
        if truncated:
            inner += f"<NextContinuationToken>{escape(last)}</NextContinuationToken>"
        self._xml("ListBucketResult", inner)


def _error_xml(err: S3Error) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{err.code}</Code>'
        f"<Message>{escape(err.message)}</Message><RequestId>0</RequestId></Error>"
    ).encode()


class SinkServer(ThreadingHTTPServer):
    """A thread per connection; large listen backlog."""

    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


def make_server(host: str = "127.0.0.1", port: int = 0, *, discard: bool = False) -> SinkServer:
    """The server, bound and not yet serving (``serve_forever()`` it in a thread or process)."""
    handler = type("BoundHandler", (Handler,), {"state": State(discard)})
    return SinkServer((host, port), handler)


class Stop:
    """Stops the server process by its PID (``stop()``); ``pid`` is there for CPU accounting."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.pid = process, process.pid

    def __call__(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_sink(*, discard: bool = False, host: str = "127.0.0.1", port: int = 0) -> tuple[str, Stop]:
    """Start the server in a separate process; returns ``(endpoint, stop)``. ``port=0`` picks a free one."""
    args = [sys.executable, os.path.abspath(__file__), "--host", host, "--port", str(port), "--exit-with-parent"]
    if discard:
        args.append("--discard")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"the sink server did not start: {line!r}")
    process.stdout.close()
    return line.split()[-1], Stop(process)


# -------------------------------------------------------------------------------------------- self test
def _raw_request(sock: socket.socket, head: bytes) -> tuple[int, int]:
    """Send ``head``; read the response's status and headers; returns (status, content length)."""
    sock.sendall(head)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    lines = header.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.lower() == b"content-length"))
    return status, length - len(rest)


def selftest(endpoint: str, size_mib: int = 1024, connections: int = 4, part_mib: int = 16) -> dict[str, float]:
    """PUT then GET ``size_mib`` over ``connections`` raw sockets (no HTTP library): the server's own throughput."""
    host, port = urlsplit(endpoint).hostname or "127.0.0.1", urlsplit(endpoint).port or 80
    part = bytes(part_mib * MiB)
    per = size_mib // part_mib // connections

    def conn() -> socket.socket:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        return sock

    with conn() as sock:
        _raw_request(sock, b"PUT /selftest HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")

    def put(i: int) -> None:
        with conn() as sock:
            for j in range(per):
                head = f"PUT /selftest/o{i}-{j} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(part)}\r\n\r\n"
                sock.sendall(head.encode())
                sock.sendall(part)
                status, rest = _raw_request(sock, b"")
                assert status == 200 and rest == 0, status

    def get(i: int) -> None:
        buf = bytearray(4 * MiB)
        with conn() as sock:
            for j in range(per):
                _, left = _raw_request(sock, f"GET /selftest/o{i}-{j} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                left -= 0
                while left > 0:
                    left -= sock.recv_into(buf, min(left, len(buf)))

    out: dict[str, float] = {}
    for name, fn in (("put", put), ("get", get)):
        threads = [threading.Thread(target=fn, args=(i,)) for i in range(connections)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        out[f"{name}_gib_per_s"] = per * connections * part_mib / 1024 / seconds
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0: a free port")
    parser.add_argument("--discard", action="store_true", help="keep only sizes and CRC32Cs; GETs serve zeros")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process ends")
    parser.add_argument("--selftest", action="store_true", help="start a server process and measure it, then exit")
    parser.add_argument("--size", type=int, default=1024, help="--selftest: MiB to PUT and GET")
    args = parser.parse_args(argv)
    if args.selftest:
        for discard in (False, True):
            endpoint, stop = start_sink(discard=discard)
            try:
                cpu0 = _proc_cpu(stop.pid)
                result = selftest(endpoint, args.size)
                cpu = _proc_cpu(stop.pid) - cpu0
            finally:
                stop()
            mode = "discard" if discard else "ram"
            print(
                f"{mode}: PUT {result['put_gib_per_s']:.2f} GiB/s, GET {result['get_gib_per_s']:.2f} GiB/s "
                f"(raw sockets, 4 connections, 16 MiB objects, {args.size} MiB each way); "
                f"server CPU {cpu / (2 * args.size / 1024):.2f} s per GiB moved"
            )
        return
    if args.exit_with_parent:  # start_sink's server must not outlive a benchmark that was killed
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    server = make_server(args.host, args.port, discard=args.discard)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.5)


def _proc_cpu(pid: int) -> float:
    """User+system CPU seconds of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Stopper = Callable[[], None]

if __name__ == "__main__":
    main()
