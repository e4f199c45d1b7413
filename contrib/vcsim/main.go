// Command backupd-vcsim is backupd's vCenter simulator launcher: VMware's govmomi
// `simulator` package (govmomi 0.24.2 as Debian ships it) with the inventory of a JSON spec,
// changed block tracking, fault injection and workarounds for three bugs of that version.
//
// It prints one line, `BACKUPD_VCSIM {json}`, once it serves, and runs until SIGTERM or
// SIGINT (exit 0). See README.md beside this file for the spec format, the control API and
// what the simulator does not do like vCenter.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
)

// readyLine is the JSON printed after "BACKUPD_VCSIM " once the server accepts connections.
type readyLine struct {
	URL        string `json:"url"`
	User       string `json:"user"`
	Password   string `json:"password"`
	Thumbprint string `json:"thumbprint"`
	Cert       string `json:"cert"`
	Datacenter string `json:"datacenter"`
	Datastore  string `json:"datastore"`
	Control    string `json:"control"`
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on (port 0: any free port)")
	useTLS := flag.Bool("tls", false, "serve https with a generated self-signed certificate")
	specFile := flag.String("spec", "", "JSON spec of the VMs to create (README.md)")
	dir := flag.String("dir", "", "datastore root folder (default: a temporary folder removed at exit)")
	user := flag.String("user", "backupd@vsphere.local", "the one user name Login accepts")
	password := flag.String("password", "vcsim-password", "the one password Login accepts")
	flag.Int64Var(&cbtWindow, "cbt-window", cbtWindow, "QueryChangedDiskAreas answers at most this many bytes of the disk per call")
	flag.IntVar(&cbtMaxExtents, "cbt-max-extents", cbtMaxExtents, "QueryChangedDiskAreas answers at most this many extents per call")
	flag.Parse()
	log.SetPrefix("backupd-vcsim: ")

	if err := run(*listen, *useTLS, *specFile, *dir, *user, *password); err != nil {
		log.Fatal(err)
	}
}

func run(listen string, useTLS bool, specFile string, dir string, user string, password string) error {
	spec := &Spec{}
	if specFile != "" {
		var err error
		if spec, err = loadSpec(specFile); err != nil {
			return err
		}
	}
	if dir == "" {
		tmp, err := ioutil.TempDir("", "backupd-vcsim-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	datastoreDir := dir
	if err := os.MkdirAll(datastoreDir, 0o755); err != nil {
		return fmt.Errorf("datastore folder %s: %w", datastoreDir, err)
	}

	// A vCenter with one datacenter, one cluster of one host, no VMs of the model's own and
	// no datastore yet (LocalDS_0 is mounted from -dir below).
	model := simulator.VPX()
	model.Machine = 0
	model.Datastore = 0
	model.Host = 0
	model.ClusterHost = 1
	if err := model.Create(); err != nil {
		return fmt.Errorf("simulator model: %w", err)
	}
	defer model.Remove()

	ctx := context.Background()
	client, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return fmt.Errorf("in-process client: %w", err)
	}
	rig = newRig(client, datastoreDir)
	installWorkarounds()
	if err := rig.buildInventory(ctx, spec); err != nil {
		return err
	}

	// The simulator's own server only serves on a loopback port nobody is told about: its
	// handlers (s.ServeMux) are put behind the front handler on the listener we announce.
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(user, password)}
	inner := model.Service.NewServer()
	inner.Close()

	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", listen, err)
	}
	scheme := "http"
	ready := readyLine{User: user, Password: password, Datacenter: datacenterName, Datastore: datastoreName}
	if useTLS {
		// the certificate lives outside the datastore, in a folder removed at exit
		certDir, err := ioutil.TempDir("", "backupd-vcsim-cert-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(certDir)
		cert, certPath, thumbprint, err := selfSignedCertificate(certDir, ln.Addr().(*net.TCPAddr).IP)
		if err != nil {
			return err
		}
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}})
		scheme = "https"
		ready.Cert, ready.Thumbprint = certPath, thumbprint
	}
	host := ln.Addr().String()
	simulator.Map.SessionManager().ServiceHostName = host
	ready.URL = fmt.Sprintf("%s://%s/sdk", scheme, host)
	ready.Control = fmt.Sprintf("%s://%s%s", scheme, host, controlPrefix)

	server := &http.Server{Handler: newFront(model.Service.ServeMux)}
	served := make(chan error, 1)
	go func() { served <- server.Serve(ln) }()

	line, _ := json.Marshal(ready)
	fmt.Printf("BACKUPD_VCSIM %s\n", line)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
		_ = server.Close()
		return nil
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	}
}
