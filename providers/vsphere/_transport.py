"""Reading (and writing) disk files: the :class:`DiskTransport` interface and its datastore
HTTP implementation.

A transport turns "disk ``key`` of this snapshot" into a :class:`~providers.base.DiskReader`.
The one here, :class:`DatastoreHttpTransport`, reads the snapshot's disk backing file over
vCenter's datastore endpoint (``GET /folder/PATH?dcPath=DC&dsName=DS``, vSphere Web Services
SDK Programming Guide, "Datastore access through HTTP") with ``Range`` requests on a pool
of keep-alive connections (urllib3) carrying the session cookie ``vmware_soap_session``,
with the TLS settings of the API connection. An NBD or VDDK transport can be added beside it.

While a snapshot exists its disk backing file (the one the snapshot's ``config`` names) is
no longer written: the guest writes into a new delta file. Its data is in the ``-flat.vmdk``
extent beside the ``.vmdk`` descriptor, one byte per disk byte, so a range of the disk is
the same range of that file. What this transport cannot read, refused with
:class:`~providers.base.DiskReadError` rather than answered with wrong bytes:

- a backing that is itself a delta (``backing.parent`` set): the VM had snapshots of its own
  before backupd's, the data is spread over the chain (VMFS sparse / SE sparse);
- SE sparse backings, raw device mappings (RDM), and any other backing type than
  ``FlatVer2BackingInfo``;
- disks on vSAN or vVols datastores (objects, not files: no ``-flat.vmdk``);
- a ``-flat.vmdk`` whose size is not the disk's capacity (not the extent it should be).
"""

from __future__ import annotations

import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode

import urllib3

from providers.base import DiskReader, DiskReadError, ProviderError, TransientProviderError
from providers.vsphere._connection import Connection, PinnedContext
from providers.vsphere._errors import Kind, Operation, http_status_kind, translate

#: datastore types whose disks are objects, not files (``Datastore.summary.type``)
OBJECT_DATASTORES = frozenset({"vsan", "VVOL", "vvol"})
_DATASTORE_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.+)$")
#: bytes streamed per chunk when uploading
_UPLOAD_CHUNK = 4 << 20


@dataclass(frozen=True)
class DatastoreFile:
    """A file on a datastore.

    :ivar datacenter: the datacenter's inventory path (``dcPath``), e.g. ``DC0``.
    :ivar datastore: the datastore's name (``dsName``).
    :ivar path: the path inside the datastore, ``web-01/web-01.vmdk``.
    """

    datacenter: str
    datastore: str
    path: str

    @classmethod
    def parse(cls, datacenter: str, name: str) -> "DatastoreFile":
        """From a datastore path as vSphere writes it, ``[LocalDS_0] web-01/web-01.vmdk``.

        :raises DiskReadError: not of that form.
        """
        match = _DATASTORE_PATH.match(name.strip())
        if match is None:
            raise DiskReadError(f"not a datastore path: {name!r}")
        return cls(datacenter, match["ds"], match["path"].strip())

    @property
    def datastore_path(self) -> str:
        """``[DS] path``."""
        return f"[{self.datastore}] {self.path}"

    def flat_extent(self) -> "DatastoreFile":
        """The ``-flat.vmdk`` extent beside a ``.vmdk`` descriptor.

        :raises DiskReadError: the name does not end ``.vmdk``.
        """
        if not self.path.endswith(".vmdk"):
            raise DiskReadError(f"{self.datastore_path} is no .vmdk descriptor")
        return DatastoreFile(self.datacenter, self.datastore, self.path[: -len(".vmdk")] + "-flat.vmdk")


class DiskTransport(ABC):
    """How disk data moves between backupd and the hypervisor's storage."""

    @abstractmethod
    def open(self, file: DatastoreFile, capacity_bytes: int, *, label: str) -> DiskReader:
        """A reader of the disk whose flat data is ``file``, ``capacity_bytes`` long.

        :raises DiskReadError: the file cannot be read as that disk.
        :raises TransientProviderError: a retry may succeed.
        """

    @abstractmethod
    def upload(self, file: DatastoreFile, source: BinaryIO, length: int) -> None:
        """Write ``length`` bytes read sequentially from ``source`` as ``file`` (created or
        replaced).

        :raises ProviderError: the upload failed.
        """

    def close(self) -> None:
        """Release connections. Idempotent."""


class DatastoreHttpTransport(DiskTransport):
    """The datastore HTTP endpoint (``/folder``), over one urllib3 pool per provider.

    :param connection: the API session: base URL, TLS context, session cookie, relogin.
    :param pool_size: keep-alive connections kept (one per VM task reading at once).
    """

    def __init__(self, connection: Connection, *, pool_size: int = 8) -> None:
        self._connection = connection
        timeout = connection.config.timeout_seconds
        self._pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=pool_size,
            block=False,
            ssl_context=connection.context,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
        )
        if isinstance(connection.context, PinnedContext):
            # the pin is the verification urllib3 cannot see: its warning would be wrong
            warnings.filterwarnings(
                "ignore", category=urllib3.exceptions.InsecureRequestWarning,
                message=rf".*host '{re.escape(connection.config.host)}'",
            )

    def url(self, file: DatastoreFile) -> str:
        """``BASE/folder/PATH?dcPath=DC&dsName=DS``."""
        query = urlencode({"dcPath": file.datacenter, "dsName": file.datastore})
        return f"{self._connection.base_url}/folder/{quote(file.path)}?{query}"

    def request(self, method: str, file: DatastoreFile, *, what: str, headers: dict[str, str] | None = None, body: Any = None, fail: type[ProviderError] = DiskReadError) -> urllib3.BaseHTTPResponse:
        """One request with the session cookie; a 401 (session expired) logs in again once.

        :returns: a response of status 2xx or 416 (the caller decides on 416).
        :raises ProviderError: the status or the network error, mapped (``fail`` for
            permanent failures, :class:`TransientProviderError` for retryable ones).
        """
        operation = Operation(what, failed=fail)
        for attempt in (1, 2):
            generation = self._connection._generation
            try:
                cookie = self._connection.session_cookie()
                response = self._pool.request(
                    method, self.url(file), headers={**(headers or {}), "Cookie": cookie},
                    body=body, preload_content=True, redirect=False,
                )
            except ProviderError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped at this boundary
                raise translate(exc, operation) from exc
            if 200 <= response.status < 300 or response.status == 416:
                return response
            kind = http_status_kind(response.status)
            if kind is Kind.AUTH and attempt == 1 and body is None:  # a streamed body cannot be sent twice
                self._connection.relogin(generation)
                continue
            message = f"{what}: HTTP {response.status} {response.reason or ''} from {self.url(file)}".rstrip()
            raise operation.class_of(kind)(message)
        raise AssertionError("unreachable")

    def size(self, file: DatastoreFile, *, what: str) -> int:
        """The file's length in bytes (``HEAD``).

        :raises DiskReadError: the file does not exist or tells no length.
        """
        response = self.request("HEAD", file, what=what)
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise DiskReadError(f"{what}: {file.datastore_path} has no Content-Length")
        return int(length)

    def open(self, file: DatastoreFile, capacity_bytes: int, *, label: str) -> DiskReader:
        extent = file.flat_extent()
        what = f"reading {label} ({extent.datastore_path})"
        size = self.size(extent, what=what)
        if size != capacity_bytes:
            raise DiskReadError(
                f"{what}: the flat extent is {size} bytes, the disk {capacity_bytes}: not a flat disk"
                " this transport can read"
            )
        return _HttpDiskReader(lambda offset, length: self._read(extent, offset, length, what=what), capacity_bytes)

    def _read(self, file: DatastoreFile, offset: int, length: int, *, what: str) -> bytes:
        response = self.request("GET", file, what=what, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        if response.status == 416:
            return b""
        data = response.data
        if response.status != 206 and not (offset == 0 and len(data) <= length):
            raise DiskReadError(f"{what}: the server ignored the Range header (HTTP {response.status})")
        if len(data) != length:
            raise TransientProviderError(f"{what}: {len(data)} bytes at offset {offset}, asked for {length}")
        return data

    def upload(self, file: DatastoreFile, source: BinaryIO, length: int) -> None:
        what = f"uploading {file.datastore_path}"

        def chunks() -> Any:
            remaining = length
            while remaining:
                chunk = source.read(min(_UPLOAD_CHUNK, remaining))
                if not chunk:
                    raise ProviderError(f"{what}: the source ended {remaining} bytes early")
                remaining -= len(chunk)
                yield chunk

        self.request(
            "PUT", file, what=what, fail=ProviderError,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
            body=chunks(),
        )

    def close(self) -> None:
        self._pool.clear()


class _HttpDiskReader(DiskReader):
    """Reads clamped to the disk's capacity; the HTTP work is the transport's."""

    def __init__(self, read: Callable[[int, int], bytes], capacity_bytes: int) -> None:
        self._read = read
        self._capacity = capacity_bytes
        self._closed = threading.Event()

    def read(self, offset: int, length: int) -> bytes:
        if self._closed.is_set():
            raise DiskReadError("the disk reader is closed")
        if offset < 0 or length < 0:
            raise DiskReadError(f"bad range: offset {offset}, length {length}")
        length = min(length, self._capacity - offset)
        if length <= 0:
            return b""
        return self._read(offset, length)

    def close(self) -> None:
        self._closed.set()
