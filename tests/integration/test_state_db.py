"""The state DB shared by processes: a fresh installation used by several processes at once."""

from __future__ import annotations

import json

from labkit import Lab


def test_commands_started_at_the_same_moment_on_a_fresh_install_all_succeed(lab: Lab) -> None:
    """Given a fresh installation (no state DB yet), when a scheduler starts two jobs at the same
    moment while an administrator lists sessions, then every command succeeds and both sessions
    are recorded. Repeated on new state DBs, since the processes race to create it."""
    lab.configure(
        vms={"vm-a": "1 MiB", "vm-b": "1 MiB"},
        jobs={"alpha": {"vms": ["vm-a"]}, "beta": {"vms": ["vm-b"]}},
    )
    for _ in range(5):
        for leftover in lab.site.glob("state.db*"):
            leftover.unlink()
        commands = [
            ("job", "start", "alpha", "--wait", "--json"),
            ("job", "start", "beta", "--wait", "--json"),
        ] + [("session", "list", "--json")] * 4
        procs = [lab.popen(*command) for command in commands]
        done = [proc.finish(timeout=60) for proc in procs]
        failures = [(p.args[5:], p.returncode, p.stderr.strip()) for p in done if p.returncode != 0]
        assert failures == [], failures
        assert sorted(s["job"] for s in json.loads(lab.run("session", "list", "--json").stdout)) == ["alpha", "beta"]
