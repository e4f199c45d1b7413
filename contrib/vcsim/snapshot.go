package main

// Snapshots the launcher's way: the snapshot's config is the VM's at that moment with its own
// copies of the disks (so a disk backing can carry the snapshot's changeId), a .vmsn file per
// snapshot in the VM folder, and removal that deletes only that .vmsn file. The simulator
// writes no delta disks: a snapshot's disk backing is the base disk, and guest writes made
// while the snapshot exists show through it.

import (
	"fmt"
	"os"
	"path"
	"sync"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// createSnapshot runs with the VM locked: it records the CBT state of each tracked disk,
// makes the snapshot object and its .vmsn file and makes it the current snapshot.
func (vm *backupdVM) createSnapshot(req *types.CreateSnapshot_Task) (types.AnyType, types.BaseMethodFault) {
	disks, err := rig.trackSnapshot(vm)
	if err != nil {
		return nil, err
	}

	inner := &simulator.VirtualMachineSnapshot{}
	inner.Vm = vm.Self
	inner.Config = *vm.Config
	inner.Config.Hardware.Device = snapshotDevices(vm.Config.Hardware.Device, disks)
	simulator.Map.Put(inner) // gives the snapshot its moref
	snap := &backupdSnapshot{VirtualMachineSnapshot: *inner}
	simulator.Map.Put(snap)

	vmsn, fault := vm.writeSnapshotFile(snap.Self)
	if fault != nil {
		simulator.Map.Remove(snap.Self)
		return nil, fault
	}
	rig.mu.Lock()
	rig.snapshots[snap.Self] = &snapshotRecord{vm: vm.Self, name: req.Name, vmsn: vmsn, disks: disks}
	rig.snapshotSerial++
	id := rig.snapshotSerial
	rig.mu.Unlock()

	item := types.VirtualMachineSnapshotTree{
		Snapshot:        snap.Self,
		Vm:              vm.Self,
		Name:            req.Name,
		Description:     req.Description,
		Id:              id,
		CreateTime:      time.Now(),
		State:           vm.Runtime.PowerState,
		Quiesced:        req.Quiesce,
		ReplaySupported: types.NewBool(false),
	}
	info := &types.VirtualMachineSnapshotInfo{}
	if vm.Snapshot != nil {
		info.RootSnapshotList = vm.Snapshot.RootSnapshotList
		info.CurrentSnapshot = vm.Snapshot.CurrentSnapshot
	}
	if info.CurrentSnapshot == nil {
		info.RootSnapshotList = append(info.RootSnapshotList, item)
	} else {
		parent := simulator.Map.Get(*info.CurrentSnapshot).(*backupdSnapshot)
		parent.ChildSnapshot = append(parent.ChildSnapshot, snap.Self)
		info.RootSnapshotList = addChild(info.RootSnapshotList, *info.CurrentSnapshot, item)
	}
	info.CurrentSnapshot = &snap.Self
	simulator.Map.Update(vm, []types.PropertyChange{{Name: "snapshot", Val: info}})
	return snap.Self, nil
}

// writeSnapshotFile creates NAME-SnapshotN.vmsn in the VM folder and lists it in the VM's
// layoutEx as the snapshot's data file; returns its datastore-relative path.
func (vm *backupdVM) writeSnapshotFile(ref types.ManagedObjectReference) (string, types.BaseMethodFault) {
	var vmx object.DatastorePath
	vmx.FromString(vm.Config.Files.VmPathName)
	dir := path.Dir(vmx.Path)
	for n := 1; ; n++ {
		rel := path.Join(dir, fmt.Sprintf("%s-Snapshot%d.vmsn", vm.Name, n))
		local, _ := rig.localPath(datastorePath(rel))
		f, err := os.OpenFile(local, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if os.IsExist(err) {
			continue
		}
		if err != nil {
			return "", &types.FileFault{File: datastorePath(rel)}
		}
		_ = f.Close()
		key := int32(0)
		for _, file := range vm.LayoutEx.File {
			if file.Key >= key {
				key = file.Key + 1
			}
		}
		vm.LayoutEx.File = append(vm.LayoutEx.File, types.VirtualMachineFileLayoutExFileInfo{
			Key: key, Name: datastorePath(rel), Type: string(types.VirtualMachineFileLayoutExFileTypeSnapshotData),
			Accessible: types.NewBool(true),
		})
		vm.LayoutEx.Snapshot = append(vm.LayoutEx.Snapshot, types.VirtualMachineFileLayoutExSnapshotLayout{
			Key: ref, DataKey: key, MemoryKey: -1, Disk: vm.LayoutEx.Disk,
		})
		vm.LayoutEx.Timestamp = time.Now()
		return rel, nil
	}
}

// removeSnapshot runs with the VM locked: removes the snapshot (its children are re-parented
// to its parent, or removed too with removeChildren), their .vmsn files and layout entries.
func (vm *backupdVM) removeSnapshot(ref types.ManagedObjectReference, removeChildren bool) types.BaseMethodFault {
	if vm.Snapshot == nil || findInTree(vm.Snapshot.RootSnapshotList, ref) == nil {
		return &types.ManagedObjectNotFound{Obj: ref}
	}
	removed := []types.ManagedObjectReference{ref}
	if removeChildren {
		removed = append(removed, allInTree(findInTree(vm.Snapshot.RootSnapshotList, ref).ChildSnapshotList)...)
	}
	info := &types.VirtualMachineSnapshotInfo{CurrentSnapshot: vm.Snapshot.CurrentSnapshot}
	info.RootSnapshotList = vm.Snapshot.RootSnapshotList
	for _, r := range removed {
		if info.CurrentSnapshot != nil && *info.CurrentSnapshot == r {
			info.CurrentSnapshot = parentInTree(info.RootSnapshotList, nil, r)
		}
		info.RootSnapshotList = removeFromTree(info.RootSnapshotList, r)
	}
	for _, r := range removed {
		vm.forgetSnapshotFiles(r)
		simulator.Map.Remove(r)
	}
	if len(info.RootSnapshotList) == 0 {
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "snapshot", Val: nil}})
		vm.Snapshot = nil
	} else {
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "snapshot", Val: info}})
	}
	return nil
}

// forgetSnapshotFiles deletes a snapshot's .vmsn file (found by name, never by layout key)
// and its layout entries.
func (vm *backupdVM) forgetSnapshotFiles(ref types.ManagedObjectReference) {
	rig.mu.Lock()
	record := rig.snapshots[ref]
	delete(rig.snapshots, ref)
	rig.mu.Unlock()
	if record == nil {
		return
	}
	name := datastorePath(record.vmsn)
	if local, err := rig.localPath(name); err == nil {
		_ = os.Remove(local)
	}
	files := vm.LayoutEx.File[:0]
	for _, f := range vm.LayoutEx.File {
		if f.Name != name {
			files = append(files, f)
		}
	}
	vm.LayoutEx.File = files
	layouts := vm.LayoutEx.Snapshot[:0]
	for _, l := range vm.LayoutEx.Snapshot {
		if l.Key != ref {
			layouts = append(layouts, l)
		}
	}
	vm.LayoutEx.Snapshot = layouts
}

// snapshotDevices copies the VM's device list for a snapshot: disks (and their backings) are
// copies carrying the changeId of disks[key]; other devices are shared, as they never change.
func snapshotDevices(devices []types.BaseVirtualDevice, disks map[int32]*diskState) []types.BaseVirtualDevice {
	out := make([]types.BaseVirtualDevice, 0, len(devices))
	for _, device := range devices {
		disk, ok := device.(*types.VirtualDisk)
		if !ok {
			out = append(out, device)
			continue
		}
		copied := *disk
		if backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			// the VM's current disk shows the latest changeId too, as on vCenter
			backing.ChangeId = ""
			if state := disks[disk.Key]; state != nil {
				backing.ChangeId = state.changeID
			}
			b := *backing
			copied.Backing = &b
		}
		out = append(out, &copied)
	}
	return out
}

// findInTree, parentInTree, addChild, removeFromTree and allInTree walk a snapshot tree.
func findInTree(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.VirtualMachineSnapshotTree {
	for i := range tree {
		if tree[i].Snapshot == ref {
			return &tree[i]
		}
		if found := findInTree(tree[i].ChildSnapshotList, ref); found != nil {
			return found
		}
	}
	return nil
}

func parentInTree(tree []types.VirtualMachineSnapshotTree, parent *types.ManagedObjectReference, ref types.ManagedObjectReference) *types.ManagedObjectReference {
	for i := range tree {
		if tree[i].Snapshot == ref {
			return parent
		}
		if found := parentInTree(tree[i].ChildSnapshotList, &tree[i].Snapshot, ref); found != nil {
			return found
		}
	}
	return nil
}

func addChild(tree []types.VirtualMachineSnapshotTree, parent types.ManagedObjectReference, item types.VirtualMachineSnapshotTree) []types.VirtualMachineSnapshotTree {
	out := make([]types.VirtualMachineSnapshotTree, len(tree))
	for i, node := range tree {
		if node.Snapshot == parent {
			node.ChildSnapshotList = append(append([]types.VirtualMachineSnapshotTree{}, node.ChildSnapshotList...), item)
		} else {
			node.ChildSnapshotList = addChild(node.ChildSnapshotList, parent, item)
		}
		out[i] = node
	}
	return out
}

// removeFromTree drops ref, putting its children in its place.
func removeFromTree(tree []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) []types.VirtualMachineSnapshotTree {
	var out []types.VirtualMachineSnapshotTree
	for _, node := range tree {
		if node.Snapshot == ref {
			out = append(out, node.ChildSnapshotList...)
			continue
		}
		node.ChildSnapshotList = removeFromTree(node.ChildSnapshotList, ref)
		out = append(out, node)
	}
	return out
}

func allInTree(tree []types.VirtualMachineSnapshotTree) []types.ManagedObjectReference {
	var out []types.ManagedObjectReference
	for _, node := range tree {
		out = append(out, node.Snapshot)
		out = append(out, allInTree(node.ChildSnapshotList)...)
	}
	return out
}

// cancellableTask is a CreateSnapshot_Task answered before it runs (slow snapshots), which
// CancelTask can stop while it waits.
type cancellableTask struct {
	simulator.Task
	once   sync.Once
	cancel chan struct{}
}

func newCancellableTask(task *simulator.Task) *cancellableTask {
	t := &cancellableTask{Task: *task, cancel: make(chan struct{})}
	simulator.Map.Put(t)
	simulator.Map.Update(&t.Task, []types.PropertyChange{
		// the method's WSDL name: the simulator's "CreateSnapshot" is none, and pyVmomi's
		// WaitForTask resolves it while the task runs
		{Name: "info.name", Val: "CreateSnapshot_Task"},
		{Name: "info.state", Val: types.TaskInfoStateRunning},
		{Name: "info.cancelable", Val: true},
	})
	return t
}

func (t *cancellableTask) cancelled() bool {
	select {
	case <-t.cancel:
		return true
	default:
		return false
	}
}

// runAfter waits the delay (or a cancel) and then runs the task with the VM locked.
func (t *cancellableTask) runAfter(delay time.Duration, vm *backupdVM) {
	select {
	case <-time.After(delay):
	case <-t.cancel:
	}
	name := vm.Name
	simulator.Map.WithLock(vm, func() { t.Task.Run() })
	rig.mu.Lock()
	if rig.creating[name]--; rig.creating[name] <= 0 {
		delete(rig.creating, name)
	}
	rig.mu.Unlock()
}

// CancelTask cancels the task if it has not run yet (vSphere: Task.CancelTask).
func (t *cancellableTask) CancelTask(req *types.CancelTask) soap.HasFault {
	t.once.Do(func() { close(t.cancel) })
	return &methods.CancelTaskBody{Res: &types.CancelTaskResponse{}}
}
