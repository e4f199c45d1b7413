package main

// The HTTP front of the launcher: the control API, faults injected into SOAP calls and
// /folder requests, DELETE on /folder, and the session bookkeeping that "expire-sessions"
// needs; everything else goes to the simulator's own handlers.

import (
	"bytes"
	"fmt"
	"io/ioutil"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

const (
	controlPrefix = "/backupd-control"
	folderPrefix  = "/folder/"
)

// front is the launcher's http.Handler in front of the simulator's ServeMux.
type front struct {
	sim http.Handler
}

func newFront(sim http.Handler) *front {
	return &front{sim: sim}
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, controlPrefix):
		serveControl(w, r)
	case strings.HasPrefix(r.URL.Path, folderPrefix):
		f.serveFolder(w, r)
	case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/sdk"):
		f.serveSOAP(w, r)
	default:
		f.sim.ServeHTTP(w, r)
	}
}

// serveFolder answers 503 while the control API asks so, DELETE (the simulator has none),
// and leaves GET (with Range), HEAD and PUT to the simulator. Requests need no session here,
// unlike vCenter's.
func (f *front) serveFolder(w http.ResponseWriter, r *http.Request) {
	if rig.take503() {
		http.Error(w, "backupd-vcsim: injected 503", http.StatusServiceUnavailable)
		return
	}
	if r.Method != http.MethodDelete {
		f.sim.ServeHTTP(w, r)
		return
	}
	if ds := r.URL.Query().Get("dsName"); ds != "" && ds != datastoreName {
		http.Error(w, fmt.Sprintf("no datastore %q", ds), http.StatusNotFound)
		return
	}
	rel := path.Clean("/" + strings.TrimPrefix(r.URL.Path, folderPrefix))
	if rel == "/" {
		http.Error(w, "refusing to delete the datastore root", http.StatusForbidden)
		return
	}
	local := filepath.Join(rig.datastoreDir, filepath.FromSlash(rel))
	if _, err := os.Lstat(local); os.IsNotExist(err) {
		http.Error(w, "no such file", http.StatusNotFound)
		return
	}
	if err := os.RemoveAll(local); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// serveSOAP injects faults and checks sessions before the simulator sees the call, and
// records the session cookies Login hands out.
func (f *front) serveSOAP(w http.ResponseWriter, r *http.Request) {
	body, err := ioutil.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		f.sim.ServeHTTP(w, r)
		return
	}
	cookie := ""
	if c, err := r.Cookie(soap.SessionCookieName); err == nil {
		cookie = c.Value
	}

	switch method.Name {
	case "RetrieveProperties", "RetrievePropertiesEx", "Fetch", "WaitForUpdatesEx", "CreateFilter":
		// the simulator serves these without a session (its property reads then come back
		// as NotAuthenticated entries in missingSet); vCenter faults the call
		if !rig.liveSession(cookie) {
			writeSOAPFault(w, "The session is not authenticated.", &types.NotAuthenticated{
				NoPermission: types.NoPermission{Object: method.This, PrivilegeId: "System.View"},
			})
			return
		}
	}
	if vm := vmOf(method.This); vm != nil && rig.liveSession(cookie) {
		if name := rig.takeFault(method.Name, vm); name != "" {
			injectFault(w, method, vm, name)
			return
		}
	}

	f.sim.ServeHTTP(w, r)

	switch method.Name {
	case "Login", "LoginByToken", "CloneSession":
		for _, c := range (&http.Response{Header: w.Header()}).Cookies() {
			if c.Name == soap.SessionCookieName {
				rig.addSession(c.Value)
			}
		}
	case "Logout":
		rig.dropSession(cookie)
	}
}

// injectFault answers a call with the named fault: a task method returns a task that failed
// with it (as vCenter fails tasks), any other method a SOAP fault.
func injectFault(w http.ResponseWriter, method *simulator.Method, vm *backupdVM, name string) {
	fault, err := newFault(name, vm)
	if err != nil {
		writeSOAPFault(w, err.Error(), &types.InvalidArgument{InvalidProperty: "fault"})
		return
	}
	if !strings.HasSuffix(method.Name, "_Task") {
		writeSOAPFault(w, fmt.Sprintf("backupd-vcsim: injected %s on %s of VM %s", name, method.Name, vm.Name), fault)
		return
	}
	task := simulator.CreateTask(vm, strings.TrimSuffix(method.Name, "_Task")+"Task", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, fault
	})
	ref := task.Run()
	writeSOAP(w, http.StatusOK, taskResponse{
		XMLName:   xml.Name{Local: method.Name + "Response"},
		Xmlns:     "urn:vim25",
		Returnval: ref,
	})
}

// newFault makes the vim fault named name ("ToolsUnavailable", "FileFault", ...), filling the
// fields a client may read (a FileFault's file, TaskInProgress's task).
func newFault(name string, vm *backupdVM) (types.BaseMethodFault, error) {
	kind, ok := types.TypeFunc()(name)
	if !ok {
		return nil, fmt.Errorf("backupd-vcsim: no vim fault type %q", name)
	}
	fault, ok := reflect.New(kind).Interface().(types.BaseMethodFault)
	if !ok {
		return nil, fmt.Errorf("backupd-vcsim: %q is not a vim fault", name)
	}
	value := reflect.ValueOf(fault).Elem()
	if file := value.FieldByName("File"); file.IsValid() && file.Kind() == reflect.String {
		file.SetString(vm.Config.Files.VmPathName)
	}
	if task := value.FieldByName("Task"); task.IsValid() && task.Type() == reflect.TypeOf(types.ManagedObjectReference{}) {
		task.Set(reflect.ValueOf(types.ManagedObjectReference{Type: "Task", Value: "task-busy"}))
	}
	return fault, nil
}

// taskResponse is "<XxxResponse xmlns="urn:vim25"><returnval type="Task">task-N</returnval>".
type taskResponse struct {
	XMLName   xml.Name
	Xmlns     string                       `xml:"xmlns,attr"`
	Returnval types.ManagedObjectReference `xml:"returnval"`
}

// soapFault is a SOAP 1.1 Fault whose detail is "<KindFault xsi:type="Kind">", the shape
// pyVmomi and govmomi decode into the vim fault.
type soapFault struct {
	XMLName xml.Name `xml:"soapenv:Fault"`
	Code    string   `xml:"faultcode"`
	String  string   `xml:"faultstring"`
	Detail  struct {
		Fault faultDetail
	} `xml:"detail"`
}

type faultDetail struct {
	fault types.BaseMethodFault
}

func (d faultDetail) MarshalXML(e *xml.Encoder, start xml.StartElement) error {
	kind := reflect.TypeOf(d.fault).Elem().Name()
	start.Name = xml.Name{Local: kind + "Fault"}
	start.Attr = []xml.Attr{
		{Name: xml.Name{Local: "xmlns"}, Value: "urn:vim25"},
		{Name: xml.Name{Local: "xsi:type"}, Value: kind},
	}
	return e.EncodeElement(d.fault, start)
}

func writeSOAPFault(w http.ResponseWriter, message string, fault types.BaseMethodFault) {
	body := &soapFault{Code: "ServerFaultCode", String: message}
	body.Detail.Fault = faultDetail{fault}
	writeSOAP(w, http.StatusInternalServerError, body)
}

// writeSOAP writes a SOAP envelope with one body element.
func writeSOAP(w http.ResponseWriter, status int, body interface{}) {
	envelope := struct {
		XMLName xml.Name    `xml:"soapenv:Envelope"`
		Env     string      `xml:"xmlns:soapenv,attr"`
		XSD     string      `xml:"xmlns:xsd,attr"`
		XSI     string      `xml:"xmlns:xsi,attr"`
		Body    interface{} `xml:"soapenv:Body"`
	}{
		Env:  "http://schemas.xmlsoap.org/soap/envelope/",
		XSD:  "http://www.w3.org/2001/XMLSchema",
		XSI:  "http://www.w3.org/2001/XMLSchema-instance",
		Body: body,
	}
	var out bytes.Buffer
	out.WriteString(xml.Header)
	if err := xml.NewEncoder(&out).Encode(envelope); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(out.Bytes())
}

// addSession, dropSession, liveSession and expireSessions keep the session cookies Login
// handed out (the simulator's own list is private to it).
func (r *Rig) addSession(id string) {
	r.mu.Lock()
	r.sessions[id] = true
	r.mu.Unlock()
}

func (r *Rig) dropSession(id string) {
	r.mu.Lock()
	delete(r.sessions, id)
	r.mu.Unlock()
}

func (r *Rig) liveSession(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sessions[id]
}

// expireSessions ends every session (TerminateSession, as an administrator would): the next
// call of each client faults NotAuthenticated, a new Login works. Returns how many ended.
func (r *Rig) expireSessions() int {
	r.mu.Lock()
	ids := make([]string, 0, len(r.sessions))
	for id := range r.sessions {
		ids = append(ids, id)
	}
	r.sessions = map[string]bool{}
	r.mu.Unlock()
	sm := simulator.Map.SessionManager()
	admin := &simulator.Context{Session: &simulator.Session{UserSession: types.UserSession{Key: "backupd-control"}}}
	for _, id := range ids {
		sm.TerminateSession(admin, &types.TerminateSession{This: sm.Self, SessionId: []string{id}})
	}
	return len(ids)
}
