package main

// The control API: JSON over HTTP under /backupd-control on the same server, for tests.
// Every answer is JSON; errors are {"error": "..."} with status 400 (bad request) or 404
// (no such VM). See README.md for the calls.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func serveControl(w http.ResponseWriter, r *http.Request) {
	call := strings.Trim(strings.TrimPrefix(r.URL.Path, controlPrefix), "/")
	if call == "state" && r.Method == http.MethodGet {
		writeJSON(w, http.StatusOK, rig.state())
		return
	}
	if r.Method != http.MethodPost {
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "POST " + controlPrefix + "/" + call})
		return
	}
	var req struct {
		Method  string  `json:"method"`
		VM      string  `json:"vm"`
		Fault   string  `json:"fault"`
		Times   int     `json:"times"`
		NewName string  `json:"new_name"`
		Seconds float64 `json:"seconds"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil && err.Error() != "EOF" {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body: " + err.Error()})
		return
	}
	result, status, err := control(call, req.Method, req.VM, req.Fault, req.Times, req.NewName, req.Seconds)
	if err != nil {
		writeJSON(w, status, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, result)
}

// control runs one control call; returns the answer, or an HTTP status and the error.
func control(call, method, vmName, fault string, times int, newName string, seconds float64) (interface{}, int, error) {
	if times <= 0 {
		times = 1
	}
	switch call {
	case "fault":
		if method == "" || vmName == "" {
			return nil, http.StatusBadRequest, fmt.Errorf("fault needs method and vm (a VM name or \"*\")")
		}
		if kind, ok := types.TypeFunc()(fault); !ok || !reflect.PtrTo(kind).Implements(reflect.TypeOf((*types.BaseMethodFault)(nil)).Elem()) {
			return nil, http.StatusBadRequest, fmt.Errorf("fault %q is no vim fault type (e.g. ApplicationQuiesceFault, ToolsUnavailable, TaskInProgress, HostCommunication, FileFault, InvalidState, SnapshotFault)", fault)
		}
		rule := &faultRule{Method: method, VM: vmName, Fault: fault, Times: times}
		if vmName != "*" {
			vm, err := rig.vmByName(vmName)
			if err != nil {
				return nil, http.StatusNotFound, err
			}
			rule.Moref = vm.Self.Value
		}
		rig.mu.Lock()
		rig.faults = append(rig.faults, rule)
		rig.mu.Unlock()
	case "clear-faults":
		rig.mu.Lock()
		rig.faults, rig.http503, rig.snapshotDelay = nil, 0, 0
		rig.mu.Unlock()
	case "http-503":
		rig.mu.Lock()
		rig.http503 = times
		rig.mu.Unlock()
	case "expire-sessions":
		return map[string]int{"expired": rig.expireSessions()}, 0, nil
	case "rename":
		vm, err := rig.vmByName(vmName)
		if err != nil {
			return nil, http.StatusNotFound, err
		}
		if newName == "" {
			return nil, http.StatusBadRequest, fmt.Errorf("rename needs new_name")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := rig.rename(ctx, vm, newName); err != nil {
			return nil, http.StatusBadRequest, err
		}
	case "cbt-reset":
		vm, err := rig.vmByName(vmName)
		if err != nil {
			return nil, http.StatusNotFound, err
		}
		rig.resetTracking(vm.Self)
	case "slow-snapshots":
		if seconds < 0 {
			return nil, http.StatusBadRequest, fmt.Errorf("seconds must be >= 0")
		}
		rig.mu.Lock()
		rig.snapshotDelay = time.Duration(seconds * float64(time.Second))
		rig.mu.Unlock()
	default:
		return nil, http.StatusNotFound, fmt.Errorf("no control call %q (fault, clear-faults, http-503, expire-sessions, rename, cbt-reset, slow-snapshots, state)", call)
	}
	return map[string]bool{"ok": true}, 0, nil
}

// vmState, diskInfo, snapshotInfo and fileInfo are the JSON of "state".
type vmState struct {
	Name         string         `json:"name"`
	Moref        string         `json:"moref"`
	InstanceUUID string         `json:"instance_uuid"`
	Path         string         `json:"path"` // inventory path, "DC0/vm/prod/web-01"
	PowerState   string         `json:"power_state"`
	CBTEnabled   bool           `json:"cbt_enabled"`
	Snapshots    []snapshotInfo `json:"snapshots"`
	Disks        []diskInfo     `json:"disks"`
}

type snapshotInfo struct {
	Name  string `json:"name"`
	Moref string `json:"moref"`
}

type diskInfo struct {
	Key           int32  `json:"key"`
	File          string `json:"file"`
	CapacityBytes int64  `json:"capacity_bytes"`
	ChangeID      string `json:"change_id"`
}

type fileInfo struct {
	Path string `json:"path"` // relative to the datastore root, "/" separated
	Size int64  `json:"size"` // bytes (of the target, for a symbolic link)
}

// state is a read-only view for tests: VMs with snapshots and disks, the datastore's files,
// pending faults and 503s.
func (r *Rig) state() interface{} {
	var vms []vmState
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := wrapVM(e.Reference())
		if vm == nil {
			continue
		}
		simulator.Map.WithLock(vm, func() {
			s := vmState{
				Name: vm.Name, Moref: vm.Self.Value, InstanceUUID: vm.Config.InstanceUuid,
				Path: inventoryPath(vm.Entity()), PowerState: string(vm.Runtime.PowerState),
				CBTEnabled: vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled,
				Snapshots:  []snapshotInfo{}, Disks: []diskInfo{},
			}
			if vm.Snapshot != nil {
				for _, ref := range allInTree(vm.Snapshot.RootSnapshotList) {
					s.Snapshots = append(s.Snapshots, snapshotInfo{Name: findInTree(vm.Snapshot.RootSnapshotList, ref).Name, Moref: ref.Value})
				}
			}
			for _, device := range vm.Config.Hardware.Device {
				if disk, ok := device.(*types.VirtualDisk); ok {
					d := diskInfo{Key: disk.Key, CapacityBytes: disk.CapacityInBytes}
					if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
						d.File, d.ChangeID = b.FileName, b.ChangeId
					}
					s.Disks = append(s.Disks, d)
				}
			}
			vms = append(vms, s)
		})
	}
	sort.Slice(vms, func(i, j int) bool { return vms[i].Path < vms[j].Path })

	files := []fileInfo{}
	_ = filepath.Walk(r.datastoreDir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(r.datastoreDir, p)
		size := info.Size()
		if target, err := os.Stat(p); err == nil {
			size = target.Size()
		}
		files = append(files, fileInfo{Path: filepath.ToSlash(rel), Size: size})
		return nil
	})

	r.mu.Lock()
	defer r.mu.Unlock()
	creating := map[string]int{}
	for name, n := range r.creating {
		creating[name] = n
	}
	faults := []faultRule{}
	for _, rule := range r.faults {
		faults = append(faults, *rule)
	}
	return map[string]interface{}{
		"vms": vms, "files": files, "faults": faults, "http_503": r.http503,
		"slow_snapshot_seconds": r.snapshotDelay.Seconds(), "creating_snapshots": creating,
	}
}

func writeJSON(w http.ResponseWriter, status int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
