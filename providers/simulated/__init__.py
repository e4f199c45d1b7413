"""The simulated hypervisor: VMs whose disks, snapshots, changed block tracking and faults are
files in one folder, so a running job, the CLI and a test all see the same VMs, and they
survive restarts.

It is part of the product (the embedded default provider and the backbone of the
integration tests), not a test double: snapshots are copy-on-write, CBT reports exactly what
the guest wrote, reads are fast, and faults and slowness can be switched on from outside.

On-disk layout (folders 0700, files 0600; JSON written atomically, tmp + rename)::

    state_dir/
      provider.json          counters (next VM and snapshot number), VM name → folder index
      provider.lock          flock: folder and snapshot id allocation, renames, publishing
                             created VMs
      vms/vm-<n>/            one folder per VM, never renamed, never named by the VM's name
        vm.json              name, uuid (the VM's stable id), disks made so far: key,
                             label, capacity_bytes, source; for a VM made by create_vm also
                             "created", power_state and its configuration
      vms/.vm-<n>.creating/  a VM create_vm is building (flock'ed create.lock inside)
        vm.lock              flock: disk creation, snapshot creation and removal
        faults.json          armed faults {op: {permanent, remaining}}
        pauses.json          paused ops [op, ...]
        faults.gen           flock of faults.json and pauses.json + a counter bumped on
                             each change of either
        paused/<op>.<id>     one per call blocked by a pause, flock'ed by that call
        disk-<key>.img       live disk: a sparse file, exactly capacity_bytes long
        disk-<key>.lock      flock: guest writes exclusive, snapshot reads / CBT shared
        disk-<key>.cbt       CBT: 16-byte epoch, then (seq, offset, length) per guest write
        snapshots/snapshot-<n>/
          snapshot.json      name, description, created_at, quiesced, each disk's changeId,
                             the VM's configuration at the snapshot
          disk-<key>.cow     sparse: old content of saved grains, at their own offsets
          disk-<key>.map     generation counter + one bit per 1 MiB grain (saved or not)

VMs: those the state folder holds, plus those the config declares that were not used yet (a
declared VM is made on first use). A rename (``rename_vm``) changes the index and ``vm.json``'s
name only; a VM made by ``create_vm`` (full-VM restore) exists in the state folder only.

Disks: a disk declared as a size is an empty sparse file; one declared as an image path is
copied sparsely into ``state_dir`` on first use, under the VM lock (the image is never
written). Device keys are 2000, 2001, ... and labels ``Hard disk 1``, ... as in vSphere.

Copy-on-write: a guest write, under the disk's exclusive lock, first copies each 1 MiB grain
it is about to change into every snapshot that has not saved that grain yet, then writes the
live disk. A snapshot read, under the shared lock, takes saved grains from the snapshot's
CoW file and the rest from the live disk. Removing a snapshot deletes its files.

Changed block tracking: every guest write is appended to the disk's change log before it is
made. A changeId ``"<epoch>/<seq>"`` names the disk after write ``seq`` of an epoch; a
snapshot records each disk's changeId, so the extents between two changeIds are exactly the
logged writes between them. A CBT reset starts a new epoch, invalidating older changeIds.

Faults (``create_snapshot``, ``quiesce``, ``remove_snapshot``, ``read``), pauses
(``create_snapshot``, ``read``: calls block until resumed) and throttles
(``read_mib_per_s``, ``snapshot_create_seconds``, ``snapshot_remove_seconds``) are described
in :mod:`providers.simulated._faults` and ``docs/simulated-hypervisor.md``.
"""

from __future__ import annotations

from providers.simulated._errors import InvalidArgument
from providers.simulated._faults import FAULT_OPS, PAUSE_OPS
from providers.simulated._provider import SimulatedProvider
from providers.simulated._vms import FIRST_DISK_KEY

__all__ = ["FAULT_OPS", "FIRST_DISK_KEY", "PAUSE_OPS", "InvalidArgument", "SimulatedProvider"]
