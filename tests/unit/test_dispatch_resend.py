"""A VM task message taken by a backup proxy that dies before claiming the task's row is lost
(delivery is acknowledged when the proxy starts the task). The session's dispatcher sends such
a message again once a proxy that could have taken it is gone; claiming is one conditional
UPDATE, so a copy that finds the row claimed does nothing. Driven here without a broker: the
dispatcher's watch step with a recorded ``send_task`` and a proxy table in memory."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from backupd.dispatch import ProxyDispatcher
from backupd.enums import TaskStatus
from backupd.state import Proxy, VmTask, utcnow


class _Registry:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], Proxy] = {}

    def start(self, host: str, pid: int) -> None:
        self.rows[(host, pid)] = Proxy(name=f"{host}/{pid}", host=host, pid=pid, pool="default", capacity=1)

    def kill(self, host: str, pid: int) -> None:
        self.rows[(host, pid)].heartbeat_at = utcnow() - timedelta(minutes=5)

    def proxies(self, *, pool: str | None = None, seen_within: float | None = None) -> list[Proxy]:
        return list(self.rows.values())


class _Store:
    def __init__(self, rows: list[VmTask]) -> None:
        self.rows = rows
        self.lines: list[str] = []

    def tasks(self, session_id: int) -> list[VmTask]:
        return self.rows

    def log(self, session_id: int, text: str, **_: Any) -> None:
        self.lines.append(text)


def _dispatcher(store: _Store, registry: _Registry, sent: list[int]) -> ProxyDispatcher:
    dispatcher = object.__new__(ProxyDispatcher)  # no broker, no watcher thread
    dispatcher.__dict__.update(
        store=store, registry=registry, session_id=7, pool="default", queue="backupd.pool.default",
        wait_seconds=600.0, stop=SimpleNamespace(requested=False), _takers={}, _announced=False,
        _no_proxy_since=None, app=SimpleNamespace(send_task=lambda name, args, queue: sent.append(args[1])),
    )
    return dispatcher


def test_an_unclaimed_vm_task_is_sent_again_once_when_a_proxy_that_could_have_taken_it_is_lost() -> None:
    registry = _Registry()
    registry.start("host-a", 1)
    registry.start("host-b", 2)
    row = VmTask(id=11, session_id=7, vm="vm-0", position=0, status=TaskStatus.PENDING)
    store, sent = _Store([row]), []
    dispatcher = _dispatcher(store, registry, sent)
    dispatcher._send(11, "vm-0")
    assert sent == [11]

    dispatcher._look({11: None})  # both proxies alive: the message waits in the queue
    assert sent == [11]

    registry.kill("host-a", 1)
    dispatcher._look({11: None})
    dispatcher._look({11: None})  # once: the proxies alive at the new send are the takers now
    assert sent == [11, 11]
    assert any("proxy pid 1 on host-a" in line for line in store.lines)

    row.status = TaskStatus.RUNNING  # a proxy claimed it: no more copies, whatever dies
    registry.kill("host-b", 2)
    row.proxy_host, row.proxy_pid = "host-c", 3
    registry.start("host-c", 3)
    dispatcher._look({11: None})
    assert sent == [11, 11]
