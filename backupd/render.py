"""What the CLI prints: JSON documents (the scripting contract) and text tables.

The JSON shapes are a contract with scripts (README, "JSON output"): keys are only ever added.
Statuses are the lower-case words of the vocabulary; times are ISO 8601 UTC; sizes are bytes.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

from backupd.state import JobSession, SessionLog, VmTask, as_utc

if TYPE_CHECKING:
    from backupd.repository import DamagedPoint, PointInfo
    from backupd.service import Backupd
    from backupd.state import Proxy


def dumps(document: Any) -> str:
    """One JSON document, as ``--json`` prints it."""
    return json.dumps(document, indent=2, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _time(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _time(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    start, end = as_utc(start), as_utc(end)
    return round((end - start).total_seconds(), 3) if start and end else None


def _value(member: Any) -> Any:
    return member.value if member is not None else None


def session_summary(session: JobSession) -> dict[str, Any]:
    """A session as ``session list --json`` gives it."""
    return {
        "id": session.id,
        "job": session.job,
        "state": _value(session.state),
        "result": _value(session.result),
        "started_at": _time(session.started_at or session.created_at),
        "ended_at": _time(session.ended_at),
    }


def task_document(task: VmTask) -> dict[str, Any]:
    """One VM task inside ``session show --json``."""
    return {
        "name": task.vm,
        "vm_id": task.vm_id,
        "status": task.status.value,
        "mode": task.mode,
        "stage": task.stage,
        "restore_point": task.restore_point,
        "snapshot": (
            {"id": task.snapshot_id, "removed": task.snapshot_removed, "error": task.snapshot_error}
            if task.snapshot_id else None
        ),
        "error": task.error,
        "warning": task.warning,
        "bytes_read": task.bytes_read,
        "bytes_total": task.bytes_total,
        "bytes_stored": task.bytes_stored,
        "started_at": _time(task.started_at),
        "ended_at": _time(task.ended_at),
        "duration_seconds": _seconds(task.started_at, task.ended_at),
        "proxy": {"host": task.proxy_host, "pid": task.proxy_pid} if task.proxy_pid is not None else None,
    }


def session_document(session: JobSession, tasks: list[VmTask], log: list[SessionLog] | None = None) -> dict[str, Any]:
    """A session as ``session show --json`` gives it."""
    document = session_summary(session)
    document.update(
        message=session.message,
        full=session.full,
        stop=(
            {"mode": session.stop_mode.value, "message": session.stop_message,
             "requested_at": _time(session.stop_requested_at), "drain_deadline": _time(session.drain_deadline),
             "reason": session.stop_reason, "recursive": session.stop_recursive}
            if session.stop_mode else None
        ),
        trigger=session.trigger or "manual",
        triggered_by=session.triggered_by,
        retry_of=session.retry_of,
        duration_seconds=_seconds(session.started_at, session.ended_at),
        runner={"host": session.owner_host, "pid": session.owner_pid} if session.owner_pid else None,
        vms=[task_document(task) for task in tasks],
    )
    if log is not None:
        document["log"] = [
            {"at": _time(line.at), "level": line.level, "vm": line.vm, "text": line.text} for line in log
        ]
    return document


def point_document(repository: str, point: "PointInfo") -> dict[str, Any]:
    """A restore point as ``restore-point list --json`` gives it."""
    return {
        "id": point.id,
        "vm": point.vm,
        "vm_id": point.vm_id,
        "job": point.job,
        "session": int(point.session) if str(point.session).isdigit() else point.session,
        "mode": point.mode,
        "logical_bytes": point.logical_bytes,
        "stored_bytes": point.stored_bytes,
        "bytes_read": point.bytes_read,
        "created_at": _time(point.created_at),
        "repository": repository,
        "disks": [
            {"key": d.key, "label": d.label, "capacity_bytes": d.capacity_bytes, "change_id": d.change_id}
            for d in point.disks
        ],
        "damaged": False,
        "problem": None,
    }


def damaged_point_document(repository: str, damaged: "DamagedPoint") -> dict[str, Any]:
    """A damaged restore point in ``restore-point list --json``: what its header still says
    (nulls where it is unreadable), ``damaged: true`` and the ``problem``."""
    if damaged.info is not None:
        document = point_document(repository, damaged.info)
    else:
        document = {
            "id": damaged.id, "vm": None, "vm_id": None, "job": None, "session": None, "mode": None, "logical_bytes": None,
            "stored_bytes": None, "bytes_read": None, "created_at": None, "repository": repository, "disks": [],
        }
    document.update(damaged=True, problem=damaged.problem)
    return document


def point_show_document(repository: str, point: "PointInfo") -> dict[str, Any]:
    """``restore-point show --json``: the ``restore-point list`` row plus ``config``, the VM
    configuration the point captured (null for points made before backupd captured it):
    ``{name, guest_os, cpus, memory_bytes, firmware, disks: [{key, label, controller,
    controller_model, bus_number, unit_number, capacity_bytes, thin}], nics: [{label, network,
    adapter_type}]}``."""
    from providers.vm_config_json import config_to_json

    document = point_document(repository, point)
    document["config"] = config_to_json(point.vm_config) if point.vm_config is not None else None
    return document


def point_show_text(document: dict[str, Any]) -> str:
    """``restore-point show`` for a person."""
    lines = [
        f"restore point {document['id']}  ({document['mode']}, repository {document['repository']})",
        f"VM:       {document['vm']}" + (f"  (id {document['vm_id']})" if document["vm_id"] else "  (no id recorded)"),
        f"job:      {document['job']}  session {document['session']}",
        f"created:  {document['created_at']}",
        f"size:     {size(document['logical_bytes'])} logical, {size(document['stored_bytes'])} stored, "
        f"{size(document['bytes_read'])} read",
    ]
    config = document["config"]
    if config is None:
        lines += ["", "no VM configuration captured (made before backupd captured it)", ""]
        lines.append(table(["DISK", "KEY", "SIZE"], ([d["label"], d["key"], size(d["capacity_bytes"])]
                                                      for d in document["disks"])))
        return "\n".join(lines)
    lines += [
        "",
        f"guest OS: {config['guest_os']}",
        f"CPUs:     {config['cpus']}",
        f"memory:   {size(config['memory_bytes'])}",
        f"firmware: {config['firmware']}",
        "",
        table(["DISK", "KEY", "CONTROLLER", "BUS:UNIT", "SIZE", "PROVISIONING"], (
            [d["label"], d["key"], f"{d['controller']} ({d['controller_model']})",
             f"{d['bus_number']}:{d['unit_number']}", size(d["capacity_bytes"]), "thin" if d["thin"] else "thick"]
            for d in config["disks"])),
    ]
    if config["nics"]:
        lines += ["", table(["NIC", "NETWORK", "ADAPTER"],
                            ([n["label"], n["network"], n["adapter_type"]] for n in config["nics"]))]
    return "\n".join(lines)


def size(count: int | None) -> str:
    """Bytes in binary units, e.g. ``12.5 MiB``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def session_text(document: dict[str, Any]) -> str:
    """``session show`` for a person."""
    lines = [
        f"session {document['id']}  job {document['job']}  state {document['state']}  "
        f"result {document['result'] or '-'}",
    ]
    if document["message"]:
        lines.append(f"message: {document['message']}")
    if document["stop"]:
        stop = document["stop"]
        lines.append(f"stop: {stop['mode']} at {stop['requested_at']}" + (f": {stop['message']}" if stop["message"] else ""))
    lines.append(f"started {document['started_at']}  ended {document['ended_at'] or '-'}")
    lines.append("")
    rows = []
    proxied = any(vm.get("proxy") for vm in document["vms"])
    for vm in document["vms"]:
        snapshot = vm["snapshot"]
        snap = "-" if not snapshot else f"{snapshot['id']} ({'removed' if snapshot['removed'] else 'NOT removed'})"
        rows.append([
            vm["name"], vm["status"], vm["mode"], f"{size(vm['bytes_read'])}/{size(vm['bytes_total'])}",
            size(vm["bytes_stored"]), vm["restore_point"], snap,
            *([f"{vm['proxy']['host']} pid {vm['proxy']['pid']}" if vm.get("proxy") else None] if proxied else []),
            vm["error"] or vm["warning"],
        ])
    headers = ["VM", "STATUS", "MODE", "READ", "STORED", "RESTORE POINT", "SNAPSHOT", *(["PROXY"] if proxied else []),
               "ERROR/WARNING"]
    lines.append(table(headers, rows))
    if document.get("log"):
        lines.append("")
        for line in document["log"]:
            who = f"[{line['vm']}] " if line["vm"] else ""
            lines.append(f"{line['at']}  {line['level']:<7} {who}{line['text']}")
    return "\n".join(lines)


def next_runs(service: "Backupd") -> dict[str, str]:
    """Each scheduled job's next run as the running daemon sees it, ISO 8601 with the offset
    of the job's schedule timezone; empty when no daemon runs (nothing would run)."""
    from backupd.state import DaemonRegistry

    registry = DaemonRegistry(service.store)
    if registry.alive() is None:
        return {}
    runs = {}
    for job, row in registry.schedules().items():
        settings = service.config.jobs.get(job)
        moment = as_utc(row.next_run)
        if moment is not None:
            zone = settings.schedule.zone() if settings is not None and settings.schedule else None
            runs[job] = (moment.astimezone(zone) if zone else moment).isoformat()
    return runs


def daemon_document(service: "Backupd") -> dict[str, Any]:
    """``daemon status --json``: ``{running, host, pid, since, config, jobs: [{job, schedule,
    next_run}], sessions: [session list rows]}``."""
    from backupd.state import DaemonRegistry

    row = DaemonRegistry(service.store).alive()
    upcoming = next_runs(service)
    return {
        "running": row is not None,
        "host": row.host if row else None,
        "pid": row.pid if row else None,
        "since": _time(row.started_at) if row else None,
        "config": row.config_path if row else None,
        "jobs": [{"job": name, "schedule": job.schedule.describe(), "next_run": upcoming.get(name)}
                 for name, job in sorted(service.config.jobs.items()) if job.schedule is not None],
        "sessions": [session_summary(session) for session in service.store.running()],
    }


def daemon_text(document: dict[str, Any]) -> str:
    """``daemon status`` for a person."""
    if document["running"]:
        head = f"daemon running: pid {document['pid']} on {document['host']} since {document['since']}"
    else:
        head = "no daemon is running on this state DB (scheduled jobs do not run)"
    lines = [head, ""]
    lines.append(table(["JOB", "SCHEDULE", "NEXT RUN"], ([j["job"], j["schedule"], j["next_run"]] for j in document["jobs"])))
    if document["sessions"]:
        lines += ["", table(["SESSION", "JOB", "STATE", "STARTED"],
                            ([s["id"], s["job"], s["state"], s["started_at"]] for s in document["sessions"]))]
    return "\n".join(lines)


def proxy_document(proxy: "Proxy") -> dict[str, Any]:
    """A backup proxy as ``proxy list --json`` gives it."""
    return {
        "name": proxy.name, "host": proxy.host, "pid": proxy.pid, "pool": proxy.pool, "capacity": proxy.capacity,
        "running": proxy.running, "peak_running": proxy.peak_running, "status": proxy.status, "note": proxy.note,
        "started_at": _time(proxy.started_at), "heartbeat_at": _time(proxy.heartbeat_at),
    }
