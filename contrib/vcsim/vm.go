package main

// Wrappers of simulator objects, registered in simulator.Map under the same moref so the
// simulator's dispatcher (reflection by method name) finds the launcher's methods first.
// Each wrapper embeds the simulator type BY VALUE as its first field: the simulator's
// property collector digs the managed object out of a wrapper through its first field and
// only handles struct values there.

import (
	"reflect"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// backupdVM is a simulator VM with the launcher's snapshots, CBT and QueryChangedDiskAreas.
type backupdVM struct {
	simulator.VirtualMachine
}

// backupdSnapshot is a snapshot whose removal works with pyVmomi's WaitForTask.
type backupdSnapshot struct {
	simulator.VirtualMachineSnapshot
}

// propertyCollector fixes Fetch of unset properties (bug 1 below).
type propertyCollector struct {
	simulator.PropertyCollector
}

// installWorkarounds replaces the property collector singleton with the fixed one and makes
// every VM the launcher's. Bug 1 of govmomi 0.24.2: Fetch (pyVmomi's way to read one
// property, e.g. vm.snapshot) of an unset property indexes an empty MissingSet and panics,
// and the HTTP server drops the connection. vCenter answers an empty FetchResponse (None).
func installWorkarounds() {
	si := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	pc := &propertyCollector{}
	pc.Self = si.Content.PropertyCollector
	simulator.Map.Put(pc)
	simulator.Map.AddHandler(taskEntities{})
}

// taskEntities clears the entity of tasks on objects that are no ManagedEntity, as vCenter
// leaves it unset: the simulator names e.g. the FileManager as DeleteDatastoreFile_Task's
// entity, and pyVmomi fails decoding such a TaskInfo (TypeError), as with bug 2.
type taskEntities struct{}

func (taskEntities) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "BackupdTaskEntities", Value: "backupd-task-entities"}
}

func (taskEntities) PutObject(obj mo.Reference) {
	task, ok := obj.(*simulator.Task)
	if !ok || task.Info.Entity == nil {
		return
	}
	if _, entity := simulator.Map.Get(*task.Info.Entity).(mo.Entity); !entity {
		task.Info.Entity, task.Info.EntityName = nil, ""
	}
}

func (taskEntities) UpdateObject(mo.Reference, []types.PropertyChange) {}

func (taskEntities) RemoveObject(types.ManagedObjectReference) {}

// fetchResponse is the FetchResponse element (the simulator's own type is internal).
type fetchResponse struct {
	Returnval types.AnyType `xml:"returnval,omitempty,typeattr"`
}

type fetchBody struct {
	Res    *fetchResponse `xml:"FetchResponse,omitempty"`
	Fault_ *soap.Fault    `xml:"http://schemas.xmlsoap.org/soap/envelope/ Fault,omitempty"`
}

func (b *fetchBody) Fault() *soap.Fault { return b.Fault_ }

// Fetch answers an empty FetchResponse for an unset property and leaves every other case to
// the simulator. req is the simulator's internal Fetch request {This, Prop}: its type lives
// in an internal package, so it is read by reflection.
func (pc *propertyCollector) Fetch(ctx *simulator.Context, req interface{}) soap.HasFault {
	r := reflect.ValueOf(req).Elem()
	this := r.FieldByName("This").Interface().(types.ManagedObjectReference)
	prop := r.FieldByName("Prop").String()
	if !(this == vim25.ServiceInstance && prop == "content") {
		res := pc.RetrievePropertiesEx(ctx, &types.RetrievePropertiesEx{SpecSet: []types.PropertyFilterSpec{{
			PropSet:   []types.PropertySpec{{Type: this.Type, PathSet: []string{prop}}},
			ObjectSet: []types.ObjectSpec{{Obj: this}},
		}}})
		if body, ok := res.(*methods.RetrievePropertiesExBody); ok && body.Res != nil && body.Res.Returnval != nil {
			objects := body.Res.Returnval.Objects
			if len(objects) == 1 && len(objects[0].PropSet) == 0 && len(objects[0].MissingSet) == 0 {
				return &fetchBody{Res: &fetchResponse{}}
			}
		}
	}
	embedded := reflect.ValueOf(&pc.PropertyCollector).MethodByName("Fetch")
	out := embedded.Call([]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(req)})
	return out[0].Interface().(soap.HasFault)
}

// wrapVM returns the launcher's VM for a VirtualMachine moref, replacing a plain simulator
// VM in the Map first (VMs made by CreateVM_Task are plain until first used); nil when there
// is no such VM.
func wrapVM(ref types.ManagedObjectReference) *backupdVM {
	var wrapped *backupdVM
	obj := simulator.Map.Get(ref)
	if obj == nil {
		return nil
	}
	simulator.Map.WithLock(obj, func() {
		switch vm := simulator.Map.Get(ref).(type) {
		case *backupdVM:
			wrapped = vm
		case *simulator.VirtualMachine:
			wrapped = &backupdVM{VirtualMachine: *vm}
			simulator.Map.Put(wrapped)
		}
	})
	return wrapped
}

// vmOf is the VM a SOAP call's "this" belongs to: the VM itself or a snapshot's VM.
func vmOf(this types.ManagedObjectReference) *backupdVM {
	switch this.Type {
	case "VirtualMachine":
		return wrapVM(this)
	case "VirtualMachineSnapshot":
		if s, ok := simulator.Map.Get(this).(*backupdSnapshot); ok {
			return wrapVM(s.Vm)
		}
	}
	return nil
}

// CreateSnapshotTask creates a snapshot the launcher's way (createSnapshot). While a slow
// snapshot delay is set (control "slow-snapshots") the task is answered running and finishes
// after the delay; CancelTask on it before then fails it with RequestCanceled, no snapshot.
func (vm *backupdVM) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	rig.mu.Lock()
	delay := rig.snapshotDelay
	rig.mu.Unlock()
	var cancel *cancellableTask
	task := simulator.CreateTask(vm, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if cancel != nil && cancel.cancelled() {
			return nil, &types.RequestCanceled{}
		}
		return vm.createSnapshot(req)
	})
	body := &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{}}
	if delay <= 0 {
		body.Res.Returnval = task.Run()
		return body
	}
	cancel = newCancellableTask(task)
	rig.mu.Lock()
	if rig.creating == nil {
		rig.creating = map[string]int{}
	}
	rig.creating[vm.Name]++
	rig.mu.Unlock()
	go cancel.runAfter(delay, vm)
	body.Res.Returnval = task.Self
	return body
}

// RemoveAllSnapshotsTask removes every snapshot, keeping the disk files.
func (vm *backupdVM) RemoveAllSnapshotsTask(ctx *simulator.Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	task := simulator.CreateTask(vm, "removeAllSnapshots", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if vm.Snapshot != nil {
			var roots []types.ManagedObjectReference
			for _, tree := range vm.Snapshot.RootSnapshotList {
				roots = append(roots, tree.Snapshot)
			}
			for _, root := range roots {
				vm.removeSnapshot(root, true)
			}
		}
		return nil, nil
	})
	return &methods.RemoveAllSnapshots_TaskBody{Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: task.Run()}}
}

// ReconfigVMTask is the simulator's, plus: turning changeTrackingEnabled off forgets the
// VM's change tracking (its changeIds become invalid, as on vCenter).
func (vm *backupdVM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	res := vm.VirtualMachine.ReconfigVMTask(ctx, req)
	if enabled := req.Spec.ChangeTrackingEnabled; enabled != nil && !*enabled {
		rig.resetTracking(vm.Self)
	}
	return res
}

// RemoveSnapshotTask removes the snapshot (and its children when asked), never a disk file.
// Bug 2 of govmomi 0.24.2: its task names the snapshot as the task's entity, which is no
// ManagedEntity, and pyVmomi's WaitForTask fails decoding it (TypeError); vCenter names the
// VM. Bug 3: its file removal follows layoutEx keys renumbered by earlier removals and can
// delete the VM's disk files.
func (s *backupdSnapshot) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	vm := wrapVM(s.Vm)
	task := simulator.CreateTask(s.Vm, "removeSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if vm == nil {
			return nil, &types.ManagedObjectNotFound{Obj: s.Vm}
		}
		var fault types.BaseMethodFault
		simulator.Map.WithLock(vm, func() { fault = vm.removeSnapshot(s.Self, req.RemoveChildren) })
		return nil, fault
	})
	return &methods.RemoveSnapshot_TaskBody{Res: &types.RemoveSnapshot_TaskResponse{Returnval: task.Run()}}
}

// RevertToSnapshotTask makes the snapshot current (the simulator's own asserts a plain VM).
// Disk contents are not reverted: the simulator writes no delta disks.
func (s *backupdSnapshot) RevertToSnapshotTask(ctx *simulator.Context, req *types.RevertToSnapshot_Task) soap.HasFault {
	vm := wrapVM(s.Vm)
	task := simulator.CreateTask(s.Vm, "revertToSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		simulator.Map.WithLock(vm, func() {
			simulator.Map.Update(vm, []types.PropertyChange{{Name: "snapshot.currentSnapshot", Val: s.Self}})
		})
		return nil, nil
	})
	return &methods.RevertToSnapshot_TaskBody{Res: &types.RevertToSnapshot_TaskResponse{Returnval: task.Run()}}
}
