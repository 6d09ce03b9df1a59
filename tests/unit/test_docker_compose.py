"""docker-compose.yml stays consistent with the README's instructions (Docker cannot run on CI machines)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_services_ports_and_credentials_match_the_readme():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"minio", "fake-gcs-server", "azurite"}
    ports = {name: [p.split(":")[-1] for p in svc["ports"]] for name, svc in services.items()}
    assert "9000" in ports["minio"] and "4443" in ports["fake-gcs-server"] and "10000" in ports["azurite"]
    for svc in services.values():
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "bind emulators to loopback only"
    env = services["minio"]["environment"]
    readme = (ROOT / "README.md").read_text()
    assert f"AWS_ACCESS_KEY_ID={env['MINIO_ROOT_USER']}" in readme
    assert f"AWS_SECRET_ACCESS_KEY={env['MINIO_ROOT_PASSWORD']}" in readme
    for endpoint in ("http://127.0.0.1:9000", "http://127.0.0.1:4443", "http://127.0.0.1:10000/devstoreaccount1"):
        assert endpoint in readme
    assert "--skipApiVersionCheck" in services["azurite"]["command"]
