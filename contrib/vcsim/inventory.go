package main

// The inventory of a spec: folders under the datacenter's vm folder and VMs whose disks are
// real files on the datastore, created through the simulator's own API (CreateVM_Task on an
// in-process client) so the simulator's bookkeeping stays its own.

import (
	"context"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	datacenterName = "DC0"
	datastoreName  = "LocalDS_0"
)

// Spec is the -spec JSON: {"vms": [...]}.
type Spec struct {
	VMs []VMSpec `json:"vms"`
}

// VMSpec is one VM of the spec. Zero values take the defaults of the README.
type VMSpec struct {
	Name      string     `json:"name"`
	Folder    string     `json:"folder"`     // sub folder of the datacenter's vm folder, "a/b" nests
	GuestID   string     `json:"guest_id"`   // vSphere guest id, default otherGuest64
	CPUs      int32      `json:"cpus"`       // default 1
	MemoryMiB int64      `json:"memory_mib"` // default 512
	Firmware  string     `json:"firmware"`   // "bios" (default) or "efi"
	CBT       bool       `json:"cbt"`        // config.changeTrackingEnabled
	NICs      []NICSpec  `json:"nics"`
	Disks     []DiskSpec `json:"disks"`
}

// NICSpec is a network adapter on a named network of DC0 ("VM Network" exists).
type NICSpec struct {
	Network string `json:"network"`
	Adapter string `json:"adapter"` // vmxnet3 (default), e1000, e1000e, vmxnet2, pcnet32
}

// DiskSpec is a disk backed by a real image file (Image) or by a new sparse file of
// CapacityBytes. Thin defaults to true, Controller to pvscsi.
type DiskSpec struct {
	Image         string `json:"image"`
	CapacityBytes int64  `json:"capacity_bytes"`
	Thin          *bool  `json:"thin"`
	Controller    string `json:"controller"` // pvscsi, lsilogic, lsilogic-sas, buslogic, nvme, sata
}

// loadSpec reads and checks a spec file; errors name the file and the VM.
func loadSpec(file string) (*Spec, error) {
	data, err := ioutil.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	spec := &Spec{}
	if err := json.Unmarshal(data, spec); err != nil {
		return nil, fmt.Errorf("spec %s: %w", file, err)
	}
	seen := map[string]bool{}
	for i := range spec.VMs {
		vm := &spec.VMs[i]
		where := fmt.Sprintf("spec %s: vms[%d] (%q)", file, i, vm.Name)
		if vm.Name == "" || strings.ContainsAny(vm.Name, "/[]") {
			return nil, fmt.Errorf("%s: a VM needs a name without '/', '[' or ']'", where)
		}
		vm.Folder = strings.Trim(vm.Folder, "/")
		key := vm.Folder + "/" + vm.Name
		if seen[key] {
			return nil, fmt.Errorf("%s: two VMs with this name in folder %q", where, vm.Folder)
		}
		seen[key] = true
		if vm.Firmware != "" && vm.Firmware != "bios" && vm.Firmware != "efi" {
			return nil, fmt.Errorf("%s: firmware must be \"bios\" or \"efi\", not %q", where, vm.Firmware)
		}
		for j, d := range vm.Disks {
			if (d.Image == "") == (d.CapacityBytes == 0) {
				return nil, fmt.Errorf("%s: disks[%d] needs exactly one of image and capacity_bytes", where, j)
			}
			if d.Image != "" && !filepath.IsAbs(d.Image) {
				return nil, fmt.Errorf("%s: disks[%d].image must be an absolute path, not %q", where, j, d.Image)
			}
			if d.CapacityBytes%512 != 0 || d.CapacityBytes < 0 {
				return nil, fmt.Errorf("%s: disks[%d].capacity_bytes must be a positive multiple of 512", where, j)
			}
		}
	}
	return spec, nil
}

// buildInventory mounts LocalDS_0 on every host and creates the spec's folders and VMs.
func (r *Rig) buildInventory(ctx context.Context, spec *Spec) error {
	finder := find.NewFinder(r.client, false)
	dc, err := finder.Datacenter(ctx, datacenterName)
	if err != nil {
		return err
	}
	finder.SetDatacenter(dc)
	hosts, err := finder.HostSystemList(ctx, "*/*")
	if err != nil {
		return err
	}
	for _, host := range hosts {
		dss, err := host.ConfigManager().DatastoreSystem(ctx)
		if err != nil {
			return err
		}
		if _, err := dss.CreateLocalDatastore(ctx, datastoreName, r.datastoreDir); err != nil {
			return fmt.Errorf("datastore %s at %s: %w", datastoreName, r.datastoreDir, err)
		}
	}
	pool, err := finder.DefaultResourcePool(ctx)
	if err != nil {
		return err
	}
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	networks := map[string]bool{}
	if nets, err := finder.NetworkList(ctx, "*"); err == nil {
		for _, n := range nets {
			networks[path.Base(n.GetInventoryPath())] = true
		}
	}
	for i := range spec.VMs {
		vm := &spec.VMs[i]
		folder, err := r.ensureFolder(ctx, folders.VmFolder, vm.Folder)
		if err != nil {
			return err
		}
		if err := r.createSpecVM(ctx, folder, pool, vm, networks); err != nil {
			return fmt.Errorf("spec VM %q (folder %q): %w", vm.Name, vm.Folder, err)
		}
	}
	return nil
}

// ensureFolder returns the folder at the "a/b" path under root, creating what is missing.
func (r *Rig) ensureFolder(ctx context.Context, root *object.Folder, rel string) (*object.Folder, error) {
	folder := root
	if rel == "" {
		return folder, nil
	}
	finder := find.NewFinder(r.client, false)
	for _, name := range strings.Split(rel, "/") {
		p := folder.InventoryPath + "/" + name
		child, err := finder.Folder(ctx, p)
		if err != nil {
			if child, err = folder.CreateFolder(ctx, name); err != nil {
				return nil, fmt.Errorf("folder %s: %w", p, err)
			}
			child.InventoryPath = p
		}
		folder = child
	}
	return folder, nil
}

// createSpecVM lays out the VM's disk files in its own datastore folder (the spec folder and
// the VM name, so equal names in two folders do not collide) and creates it, powered off.
func (r *Rig) createSpecVM(ctx context.Context, folder *object.Folder, pool *object.ResourcePool, vm *VMSpec, networks map[string]bool) error {
	vmDir := path.Join(vm.Folder, vm.Name)
	if err := os.MkdirAll(filepath.Join(r.datastoreDir, vmDir), 0o755); err != nil {
		return err
	}
	var devices object.VirtualDeviceList
	controllers := map[string]types.BaseVirtualController{}
	for i, d := range vm.Disks {
		kind := d.Controller
		if kind == "" {
			kind = "pvscsi"
		}
		controller, ok := controllers[kind]
		if !ok {
			device, err := newController(devices, kind)
			if err != nil {
				return fmt.Errorf("disks[%d]: %w", i, err)
			}
			devices = append(devices, device)
			controller = device.(types.BaseVirtualController)
			controllers[kind] = controller
		}
		base := vm.Name
		if i > 0 {
			base = fmt.Sprintf("%s_%d", vm.Name, i)
		}
		capacity, err := r.writeDiskFiles(path.Join(vmDir, base), d, kind)
		if err != nil {
			return fmt.Errorf("disks[%d]: %w", i, err)
		}
		thin := d.Thin == nil || *d.Thin
		disk := &types.VirtualDisk{
			CapacityInBytes: capacity,
			CapacityInKB:    capacity / 1024,
			VirtualDevice: types.VirtualDevice{
				Key: devices.NewKey(),
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					DiskMode:        string(types.VirtualDiskModePersistent),
					ThinProvisioned: types.NewBool(thin),
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
						FileName: datastorePath(path.Join(vmDir, base+".vmdk")),
					},
				},
			},
		}
		devices.AssignController(disk, controller)
		devices = append(devices, disk)
	}
	for i, n := range vm.NICs {
		if !networks[n.Network] {
			return fmt.Errorf("nics[%d]: no network %q in %s", i, n.Network, datacenterName)
		}
		adapter := n.Adapter
		if adapter == "" {
			adapter = "vmxnet3"
		}
		nic, err := devices.CreateEthernetCard(adapter, &types.VirtualEthernetCardNetworkBackingInfo{
			VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: n.Network},
		})
		if err != nil {
			return fmt.Errorf("nics[%d]: %w", i, err)
		}
		devices = append(devices, nic)
	}
	changes, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		return err
	}
	for _, change := range changes {
		// the disk files exist already: attach them (ConfigSpec asks to create disks)
		change.GetVirtualDeviceConfigSpec().FileOperation = ""
	}
	config := types.VirtualMachineConfigSpec{
		Name:                  vm.Name,
		GuestId:               defaultString(vm.GuestID, "otherGuest64"),
		NumCPUs:               defaultInt32(vm.CPUs, 1),
		MemoryMB:              defaultInt64(vm.MemoryMiB, 512),
		Firmware:              defaultString(vm.Firmware, "bios"),
		ChangeTrackingEnabled: types.NewBool(vm.CBT),
		Files:                 &types.VirtualMachineFileInfo{VmPathName: datastorePath(path.Join(vmDir, vm.Name+".vmx"))},
		DeviceChange:          changes,
	}
	task, err := folder.CreateVM(ctx, config, pool, nil)
	if err != nil {
		return err
	}
	return task.Wait(ctx)
}

// newController makes a disk controller of a spec's kind with a new negative device key.
func newController(devices object.VirtualDeviceList, kind string) (types.BaseVirtualDevice, error) {
	switch kind {
	case "pvscsi", "lsilogic", "lsilogic-sas", "buslogic":
		return devices.CreateSCSIController(kind)
	case "nvme":
		return devices.CreateNVMEController()
	case "sata":
		c := &types.VirtualAHCIController{}
		c.Key = devices.NewKey()
		return c, nil
	}
	return nil, fmt.Errorf("unknown controller %q (pvscsi, lsilogic, lsilogic-sas, buslogic, nvme or sata)", kind)
}

// writeDiskFiles lays out a disk as vSphere does: the descriptor BASE.vmdk and the data
// extent BASE-flat.vmdk, here a symbolic link to the spec's image (so a write to the image is
// a guest write) or a new sparse file of capacity_bytes. Returns the capacity in bytes.
func (r *Rig) writeDiskFiles(base string, d DiskSpec, controller string) (int64, error) {
	flat := filepath.Join(r.datastoreDir, base+"-flat.vmdk")
	capacity := d.CapacityBytes
	if d.Image != "" {
		info, err := os.Stat(d.Image)
		if err != nil {
			return 0, fmt.Errorf("image: %w", err)
		}
		capacity = info.Size()
		if capacity == 0 || capacity%512 != 0 {
			return 0, fmt.Errorf("image %s: size %d is not a positive multiple of 512 bytes", d.Image, capacity)
		}
		if err := os.Symlink(d.Image, flat); err != nil {
			return 0, err
		}
	} else {
		f, err := os.Create(flat)
		if err != nil {
			return 0, err
		}
		err = f.Truncate(capacity)
		_ = f.Close()
		if err != nil {
			return 0, err
		}
	}
	descriptor := vmdkDescriptor(path.Base(base)+"-flat.vmdk", capacity, controller, d.Thin == nil || *d.Thin)
	return capacity, ioutil.WriteFile(filepath.Join(r.datastoreDir, base+".vmdk"), []byte(descriptor), 0o644)
}

// vmdkDescriptor is the text descriptor of a monolithic flat VMFS disk (VMware Virtual Disk
// Format 1.1, "vmfs" create type) with one extent of capacity bytes.
func vmdkDescriptor(extent string, capacity int64, controller string, thin bool) string {
	adapter := map[string]string{"pvscsi": "pvscsi", "lsilogic": "lsilogic", "lsilogic-sas": "lsilogic", "buslogic": "buslogic"}[controller]
	if adapter == "" {
		adapter = "lsilogic"
	}
	thinFlag := "0"
	if thin {
		thinFlag = "1"
	}
	return fmt.Sprintf(`# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s"

# The Disk Data Base
#DDB

ddb.adapterType = "%s"
ddb.thinProvisioned = "%s"
ddb.virtualHWVersion = "13"
`, capacity/512, extent, adapter, thinFlag)
}

// datastorePath is "[LocalDS_0] rel".
func datastorePath(rel string) string {
	return fmt.Sprintf("[%s] %s", datastoreName, rel)
}

func defaultString(v, d string) string {
	if v == "" {
		return d
	}
	return v
}

func defaultInt32(v, d int32) int32 {
	if v == 0 {
		return d
	}
	return v
}

func defaultInt64(v, d int64) int64 {
	if v == 0 {
		return d
	}
	return v
}
