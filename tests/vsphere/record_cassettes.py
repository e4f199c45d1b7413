"""Record the vSphere cassettes in ``fixtures/cassettes/`` against a vCenter simulator
(``make cassettes``).

The vCenter comes from the environment: ``BACKUPD_VC_URL`` (``http://127.0.0.1:8989``),
``BACKUPD_VC_USER`` and ``BACKUPD_VC_PASSWORD``; without them the project's launcher is started
(:class:`tests.vsphere_sim.Vcsim`) with the VMs of :data:`SPEC`. Each scenario of :mod:`tests.vsphere.scenarios` is recorded
into ``<name>.yaml`` beside its expected outcome ``<name>.json``; passwords and session
cookies are scrubbed before writing. Run from the repository's root:

    python tests/vsphere/record_cassettes.py [SCENARIO ...]
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from providers.vsphere import VsphereProvider  # noqa: E402
from providers.vsphere.config import VsphereProviderConfig  # noqa: E402
from vsphere.cassettes import CASSETTES, recorder  # noqa: E402
from vsphere.scenarios import SCENARIOS  # noqa: E402

PASSWORD_ENV = "BACKUPD_VC_PASSWORD"
#: the launcher's VMs (contrib/vcsim/README.md "Spec"): the scenarios use the first one listed
SPEC = {"vms": [
    {"name": "app-01", "folder": "prod", "cbt": True, "disks": [{"capacity_bytes": 4 << 20}], "nics": [{"network": "VM Network"}]},
    {"name": "db-01", "disks": [{"capacity_bytes": 2 << 20}]},
]}


@contextlib.contextmanager
def vcenter() -> Iterator[tuple[str, str]]:
    """(URL, user) of the vCenter to record against; the password is in ``PASSWORD_ENV``."""
    url = os.environ.get("BACKUPD_VC_URL")
    if url:
        yield url, os.environ.get("BACKUPD_VC_USER", "user")
        return
    from vsphere_sim import Vcsim  # the project's launcher (tests/vsphere_sim.py)

    with tempfile.TemporaryDirectory() as tmp, Vcsim(SPEC, Path(tmp)) as sim:
        os.environ[PASSWORD_ENV] = sim.password
        yield sim.url, sim.user


def main(names: list[str]) -> int:
    CASSETTES.mkdir(parents=True, exist_ok=True)
    failed = 0
    with vcenter() as (url, user):
        parsed = urlparse(url)
        config = VsphereProviderConfig.model_validate({
            "type": "vsphere", "host": parsed.hostname, "port": parsed.port or 443, "user": user,
            "password_env": PASSWORD_ENV, "protocol": parsed.scheme,
        })
        for name in names or sorted(SCENARIOS):
            cassette = CASSETTES / f"{name}.yaml"
            cassette.unlink(missing_ok=True)
            provider = VsphereProvider("vc", config)
            try:
                with recorder("all").use_cassette(cassette.name):
                    outcome = SCENARIOS[name](provider)
                    provider.close()
            except Exception as exc:  # noqa: BLE001 - report each scenario, record the others
                print(f"{name}: FAILED, not recorded: {type(exc).__name__}: {exc}", file=sys.stderr)
                cassette.unlink(missing_ok=True)
                failed += 1
                continue
            (CASSETTES / f"{name}.json").write_text(json.dumps(outcome, indent=2, sort_keys=True) + "\n")
            print(f"{name}: recorded {cassette.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
