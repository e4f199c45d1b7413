"""The vSphere provider replayed from vcrpy cassettes (``fixtures/cassettes/``): connection and
login, inventory, snapshot creation and removal and the fault paths, with no vCenter at all.

A cassette that is not in the repository yet (recorded by ``make cassettes`` with the
project's simulator launcher) is skipped locally and fails under ``CI``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from providers.vsphere import VsphereProvider  # noqa: E402
from providers.vsphere.config import VsphereProviderConfig  # noqa: E402
from vsphere.cassettes import CASSETTES, SCRUBBED, USER, recorder  # noqa: E402
from vsphere.scenarios import SCENARIOS  # noqa: E402


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> VsphereProvider:
    monkeypatch.setenv("BACKUPD_VC_PASSWORD", SCRUBBED)
    config = VsphereProviderConfig.model_validate({
        # any host and port: requests are matched on method, path and query
        "type": "vsphere", "host": "127.0.0.1", "port": 9, "user": USER,
        "password_env": "BACKUPD_VC_PASSWORD", "protocol": "http",
    })
    return VsphereProvider("vc", config)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_recorded_scenario_replays_to_its_recorded_outcome(scenario: str, provider: VsphereProvider) -> None:
    cassette = CASSETTES / f"{scenario}.yaml"
    if not cassette.exists():
        message = f"{cassette} is not recorded yet (make cassettes)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    expected = json.loads((CASSETTES / f"{scenario}.json").read_text())

    with recorder("none").use_cassette(cassette.name) as played:
        outcome = SCENARIOS[scenario](provider)
        provider.close()

    assert json.loads(json.dumps(outcome)) == expected
    assert played.play_count > 0


def test_no_cassette_holds_a_password_or_a_session_cookie() -> None:
    for cassette in sorted(CASSETTES.glob("*.yaml")):
        text = cassette.read_text()
        assert "<password" not in text or f">{SCRUBBED}</password>" in text, cassette
        assert text.count("<password") == text.count(f">{SCRUBBED}</password>"), cassette
        sessions = re.findall(r"vmware_soap_session=(\"[^\"]*\"|[^;\s]*)", text)
        assert set(sessions) <= {'"scrubbed-session"'}, cassette
        assert not re.search(r"^\s+Cookie:", text, re.MULTILINE), cassette
