"""The deduplicating repository: restore points made of content-addressed, compressed blocks.

Public face of the package; the modules behind it each hold one concern::

    _layout       paths, VM keys, point ids, repository.json, durable-write primitives
    _locking      repository lock (writers shared, GC exclusive) and staging ownership
    _blocks       block store: BLAKE3 names, zstd frames, staging and publishing
    _manifest     restore point manifests: JSON header line + binary block maps
    _writer       PointWriter / DiskWriter: writing one restore point
    _maintenance  retention, garbage collection, verification
    _restore      restoring a point into raw disk images
    _stream       reading a point's disks as sequential streams (full-VM restore)
    _repository   the Repository facade

The on-disk format is described in ``docs/repository-format.md``.
"""

from __future__ import annotations

from ._maintenance import GcResult, VerifyResult
from ._manifest import BasePoint, DamagedPoint, PointDisk, PointInfo
from ._repository import Repository
from ._restore import image_name
from ._stream import DiskStream, PointReader
from ._writer import DiskWriter, PointWriter

__all__ = [
    "BasePoint",
    "DamagedPoint",
    "DiskStream",
    "DiskWriter",
    "GcResult",
    "PointDisk",
    "PointInfo",
    "PointReader",
    "PointWriter",
    "Repository",
    "VerifyResult",
    "image_name",
]
