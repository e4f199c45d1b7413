package main

// Changed block tracking as vCenter offers it: with config.changeTrackingEnabled, each
// snapshot's disk backings carry a changeId "<disk tracking uuid>/<sequence>", and
// QueryChangedDiskAreas answers which areas of a snapshot's disk differ from the state a
// changeId names. Disk states are recorded at snapshot creation by hashing the data file in
// chunks of cbtChunk bytes, so areas are reported at that granularity.

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// cbtChunk is the tracking granularity in bytes.
const cbtChunk = 64 * 1024

var (
	// cbtWindow: one QueryChangedDiskAreas answer covers at most this many bytes of the disk
	// (vCenter also answers in pieces; the client asks again from startOffset+length).
	cbtWindow int64 = 16 * 1024 * 1024
	// cbtMaxExtents: one answer carries at most this many extents.
	cbtMaxExtents = 64
)

// chunkHash identifies a chunk's content; the zero value means all-zero bytes.
type chunkHash [16]byte

// diskState is a disk's content at one snapshot, by chunk.
type diskState struct {
	changeID string
	capacity int64 // bytes
	chunks   []chunkHash
}

// vmTracking is the change tracking of one VM: per disk device key, its tracking uuid, the
// last sequence number and every state a valid changeId names.
type vmTracking struct {
	disks map[int32]*diskTracking
}

type diskTracking struct {
	uuid   string
	seq    int
	states map[string]*diskState
}

// trackSnapshot runs at snapshot creation with the VM locked. With changeTrackingEnabled,
// it hashes every disk and returns its state with a new changeId, by device key; otherwise
// it forgets the VM's tracking and returns nil (the snapshot has no changeIds).
func (r *Rig) trackSnapshot(vm *backupdVM) (map[int32]*diskState, types.BaseMethodFault) {
	if vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled {
		r.resetTracking(vm.Self)
		return nil, nil
	}
	states := map[int32]*diskState{}
	for _, device := range vm.Config.Hardware.Device {
		disk, ok := device.(*types.VirtualDisk)
		if !ok {
			continue
		}
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		flat, err := r.localPath(strings.Replace(backing.FileName, ".vmdk", "-flat.vmdk", 1))
		if err != nil {
			return nil, &types.FileFault{File: backing.FileName}
		}
		chunks, err := hashChunks(flat, disk.CapacityInBytes)
		if err != nil {
			return nil, &types.FileFault{File: backing.FileName}
		}
		states[disk.Key] = &diskState{capacity: disk.CapacityInBytes, chunks: chunks}
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	tracking := r.tracking[vm.Self]
	if tracking == nil {
		tracking = &vmTracking{disks: map[int32]*diskTracking{}}
		r.tracking[vm.Self] = tracking
	}
	for key, state := range states {
		disk := tracking.disks[key]
		if disk == nil {
			disk = &diskTracking{uuid: trackingUUID(), states: map[string]*diskState{}}
			tracking.disks[key] = disk
		}
		disk.seq++
		state.changeID = fmt.Sprintf("%s/%d", disk.uuid, disk.seq)
		disk.states[state.changeID] = state
	}
	return states, nil
}

// resetTracking invalidates every changeId of the VM (control "cbt-reset", CBT turned off):
// the next snapshot starts new tracking uuids.
func (r *Rig) resetTracking(vm types.ManagedObjectReference) {
	r.mu.Lock()
	delete(r.tracking, vm)
	r.mu.Unlock()
}

// trackingUUID is a random uuid in the form of vSphere changeIds: "52 de ... 9a-0b ... 1f".
func trackingUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	hex := make([]string, 16)
	for i, x := range b {
		hex[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(hex[:8], " ") + "-" + strings.Join(hex[8:], " ")
}

// hashChunks hashes the file by cbtChunk bytes up to capacity (missing bytes read as zero).
func hashChunks(file string, capacity int64) ([]chunkHash, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n := (capacity + cbtChunk - 1) / cbtChunk
	chunks := make([]chunkHash, n)
	buf := make([]byte, cbtChunk)
	for i := int64(0); i < n; i++ {
		size := int64(cbtChunk)
		if rest := capacity - i*cbtChunk; rest < size {
			size = rest
		}
		got, err := io.ReadFull(f, buf[:size])
		if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
			return nil, err
		}
		data := buf[:got]
		if isZero(data) {
			continue
		}
		sum := sha256.Sum256(data)
		copy(chunks[i][:], sum[:16])
		if chunks[i] == (chunkHash{}) {
			chunks[i][0] = 1 // never confuse data with the all-zero marker
		}
	}
	return chunks, nil
}

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// QueryChangedDiskAreas answers the areas of the snapshot's disk deviceKey, from
// startOffset, that changed since the state changeId names ("*": that are allocated, i.e.
// not all zero), at most cbtWindow bytes and cbtMaxExtents extents per answer: the answer's
// length tells how far it covered. Faults as vCenter: FileFault for a changeId that is not
// (or no longer) valid or a snapshot taken without tracking, InvalidArgument for an offset
// past the disk, ManagedObjectNotFound for a snapshot that is not this VM's.
func (vm *backupdVM) QueryChangedDiskAreas(req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	info, fault := vm.changedAreas(req)
	if fault != nil {
		body.Fault_ = simulator.Fault(fmt.Sprintf("QueryChangedDiskAreas: %T", fault), fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func (vm *backupdVM) changedAreas(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, types.BaseMethodFault) {
	if req.Snapshot == nil {
		return nil, &types.InvalidArgument{InvalidProperty: "snapshot"}
	}
	rig.mu.Lock()
	defer rig.mu.Unlock()
	record := rig.snapshots[*req.Snapshot]
	if record == nil || record.vm != vm.Self {
		return nil, &types.ManagedObjectNotFound{Obj: *req.Snapshot}
	}
	target := record.disks[req.DeviceKey]
	if target == nil {
		return nil, &types.FileFault{File: fmt.Sprintf("disk %d of snapshot %s has no change tracking", req.DeviceKey, record.name)}
	}
	var base *diskState
	if req.ChangeId != "*" {
		var tracked *diskTracking
		if tracking := rig.tracking[vm.Self]; tracking != nil {
			tracked = tracking.disks[req.DeviceKey]
		}
		if tracked == nil || tracked.states[req.ChangeId] == nil || tracked.states[target.changeID] == nil {
			return nil, &types.FileFault{File: fmt.Sprintf("changeId %q is not valid for disk %d (change tracking was reset)", req.ChangeId, req.DeviceKey)}
		}
		base = tracked.states[req.ChangeId]
	}
	if req.StartOffset < 0 || req.StartOffset >= target.capacity || req.StartOffset%cbtChunk != 0 {
		return nil, &types.InvalidArgument{InvalidProperty: "startOffset"}
	}

	end := req.StartOffset + cbtWindow
	if end > target.capacity {
		end = target.capacity
	}
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: end - req.StartOffset}
	for i := req.StartOffset / cbtChunk; i*cbtChunk < end; i++ {
		changed := target.chunks[i] != chunkHash{}
		if base != nil {
			changed = i >= int64(len(base.chunks)) || target.chunks[i] != base.chunks[i]
		}
		if !changed {
			continue
		}
		start, length := i*cbtChunk, int64(cbtChunk)
		if start+length > target.capacity {
			length = target.capacity - start
		}
		last := len(info.ChangedArea) - 1
		if last >= 0 && info.ChangedArea[last].Start+info.ChangedArea[last].Length == start {
			info.ChangedArea[last].Length += length
			continue
		}
		if len(info.ChangedArea) == cbtMaxExtents {
			info.Length = start - req.StartOffset // the next answer starts with this extent
			break
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: start, Length: length})
	}
	return info, nil
}
