package main

// The launcher's own state beside the simulator's Map: injected faults, CBT tracking and
// the snapshot records, guarded by one mutex. Objects of the simulator are changed only
// under their Map lock (simulator.Map.WithLock), as the simulator's own handlers do.

import (
	"context"
	"fmt"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// rig is the one launcher state (the simulator itself keeps its inventory in the global
// simulator.Map, so there is one per process anyway).
var rig *Rig

// Rig holds what the launcher adds to the simulator.
type Rig struct {
	client       *vim25.Client // in-process client: the simulator's API without HTTP
	datastoreDir string        // LocalDS_0's folder

	mu             sync.Mutex
	faults         []*faultRule
	http503        int                                              // /folder requests still to answer 503
	snapshotDelay  time.Duration                                    // CreateSnapshot_Task runs this long
	creating       map[string]int                                   // VM name → slow snapshot tasks still running
	sessions       map[string]bool                                  // session cookies handed out by Login
	tracking       map[types.ManagedObjectReference]*vmTracking     // CBT per VM
	snapshots      map[types.ManagedObjectReference]*snapshotRecord // per snapshot
	snapshotSerial int32                                            // the last snapshot id handed out
}

// faultRule makes the next Times calls of Method on the VM with moref value Moref (or any
// VM when VM is "*") fail with Fault.
type faultRule struct {
	Method string `json:"method"`
	VM     string `json:"vm"` // as the control call named it
	Moref  string `json:"moref"`
	Fault  string `json:"fault"`
	Times  int    `json:"times"`
}

// snapshotRecord is what the launcher knows of a snapshot beyond the simulator's object.
type snapshotRecord struct {
	vm    types.ManagedObjectReference
	name  string
	vmsn  string               // datastore-relative path of the snapshot's .vmsn file
	disks map[int32]*diskState // by device key; only disks tracked by CBT at the snapshot
}

func newRig(client *vim25.Client, datastoreDir string) *Rig {
	return &Rig{
		client:       client,
		datastoreDir: datastoreDir,
		sessions:     map[string]bool{},
		tracking:     map[types.ManagedObjectReference]*vmTracking{},
		snapshots:    map[types.ManagedObjectReference]*snapshotRecord{},
	}
}

// takeFault consumes one call of the first rule matching method on vm and returns its fault
// name, or "" when no rule matches.
func (r *Rig) takeFault(method string, vm *backupdVM) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, rule := range r.faults {
		if rule.Method == method && (rule.Moref == vm.Self.Value || rule.VM == "*") {
			rule.Times--
			if rule.Times <= 0 {
				r.faults = append(r.faults[:i], r.faults[i+1:]...)
			}
			return rule.Fault
		}
	}
	return ""
}

// take503 consumes one of the /folder requests to answer 503.
func (r *Rig) take503() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.http503 > 0 {
		r.http503--
		return true
	}
	return false
}

// localPath is the file on this machine of a "[LocalDS_0] dir/file" datastore path.
func (r *Rig) localPath(dsPath string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(dsPath) || p.Datastore != datastoreName {
		return "", fmt.Errorf("%q is not a path on datastore %s", dsPath, datastoreName)
	}
	return filepath.Join(r.datastoreDir, filepath.FromSlash(p.Path)), nil
}

// vmByName finds one VM by name, moref value ("vm-42") or inventory path ("DC0/vm/prod/web-01").
func (r *Rig) vmByName(name string) (*backupdVM, error) {
	var found []*backupdVM
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := wrapVM(e.Reference())
		if vm == nil {
			continue
		}
		if vm.Name == name || vm.Self.Value == name || inventoryPath(vm.Entity()) == strings.Trim(name, "/") {
			found = append(found, vm)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no VM %q", name)
	case 1:
		return found[0], nil
	}
	var paths []string
	for _, vm := range found {
		paths = append(paths, inventoryPath(vm.Entity()))
	}
	return nil, fmt.Errorf("VM name %q is ambiguous: %s (use the inventory path)", name, strings.Join(paths, ", "))
}

// inventoryPath is "DC0/vm/prod/web-01" for a managed entity.
func inventoryPath(e *mo.ManagedEntity) string {
	names := []string{e.Name}
	for parent := e.Parent; parent != nil; {
		obj, ok := simulator.Map.Get(*parent).(mo.Entity)
		if !ok || obj.Entity().Parent == nil {
			break // the root folder is not part of the path
		}
		names = append([]string{obj.Entity().Name}, names...)
		parent = obj.Entity().Parent
	}
	return path.Join(names...)
}

// rename renames a VM through Rename_Task (its instanceUuid stays).
func (r *Rig) rename(ctx context.Context, vm *backupdVM, newName string) error {
	task, err := object.NewVirtualMachine(r.client, vm.Self).Rename(ctx, newName)
	if err != nil {
		return err
	}
	return task.Wait(ctx)
}
