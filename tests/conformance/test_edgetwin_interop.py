"""edgetwin and Microsoft's SDKs, both ways, on the session emulator.

- The tutorial's UpdateModuleTwinDesiredProperties.py (Python service SDK) PATCHes
  `telemetryInterval`; the edgetwin daemon (`edgetwin run --config`, a real process)
  applies it and acknowledges it in the reported properties, as the service sees them.
- `edgetwin twin set` PATCHes desired; the tutorial's ReceiveModuleTwinDesiredPropertiesPatch.py
  (Python device SDK) prints the patch.
- `edgetwin provision --ca-file` writes a module connection string that the Python module
  client uses unchanged (connect, get_twin, patch reported), with a registry policy key
  and with only a device's own key (`method = "device"`).

The tutorial's programs come from the seed document, changed only on their
`CONNECTION_STRING` line (see test_tutorial.py). The daemon and the receiver use the same
identity (`myFirstDevice/myFirstModule`, hard-coded in the tutorial), one at a time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hub_helpers import ModuleIdentity, unique_id
from simproc import _die_with_parent, edgetwin_binary
from test_tutorial import (
    DEVICE_ID,
    MODULE_ID,
    Receiver,
    create_module_with_tutorial,
    run_service_program,
    section_after,
    wait_until_connected,
    write_program,
)
from tutorial_source import load_programs

COMMAND_TIMEOUT_S = 60
ACK_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def tutorial() -> dict[str, str]:
    return load_programs()


def edgetwin_env(**extra: str) -> dict[str, str]:
    """The environment without any EDGETWIN_* setting of the caller's, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("EDGETWIN_")
        and name not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC")
    }
    env.update(extra)
    return env


def run_edgetwin(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(edgetwin_binary()), *args],
        env=edgetwin_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def toml_string(value: object) -> str:
    text = str(value)
    assert '"' not in text and "\\" not in text, text
    return f'"{text}"'


class Daemon:
    """`edgetwin run --config CONFIG` in the background, its log in a file."""

    def __init__(self, config: Path):
        self.log_path = config.with_suffix(".log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(edgetwin_binary()), "run", "--config", str(config)],
                env=edgetwin_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def check_running(self) -> None:
        code = self.process.poll()
        assert code is None, f"edgetwin run exited with {code}:\n{self.log()}"

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"edgetwin run ignored SIGTERM:\n{self.log()}") from None
        return self.process.returncode


def daemon_config(directory: Path, module_connstr: str, ca_path: Path) -> Path:
    """The daemon pointed at the session emulator: MQTT on 127.0.0.1:8883, its CA trusted."""
    credential = directory / "module.connstr"
    credential.write_text(module_connstr + "\n", encoding="utf-8")
    credential.chmod(0o600)
    config = directory / "edgetwin.toml"
    config.write_text(
        "[hub]\n"
        f"connection_string_file = {toml_string(credential)}\n"
        'gateway_host = "127.0.0.1:8883"\n'
        f"ca_file = {toml_string(ca_path)}\n"
        'backoff = { initial = "200ms", max = "2s" }\n\n'
        f"[state]\ndir = {toml_string(directory / 'state')}\n\n"
        '[log]\nlevel = "info"\nformat = "text"\n',
        encoding="utf-8",
    )
    return config


def wait_for_ack(registry, device_id: str, module_id: str, name: str, value, daemon: Daemon) -> dict:
    """Until the module twin's reported `name` acknowledges the current desired $version."""
    deadline = time.monotonic() + ACK_TIMEOUT_S
    twin = None
    while time.monotonic() < deadline:
        daemon.check_running()
        twin = registry.get_module_twin(device_id, module_id)
        version = twin.properties.desired["$version"]
        ack = twin.properties.reported.get(name)
        if isinstance(ack, dict) and ack.get("av") == version:
            assert ack == {"value": value, "ac": 200, "av": version, "ad": "applied"}, ack
            return ack
        time.sleep(0.2)
    raise AssertionError(
        f"no acknowledgement of {name}={value!r} within {ACK_TIMEOUT_S} s; last twin: "
        f"{twin.properties if twin else None}\ndaemon log:\n{daemon.log()}"
    )


def test_daemon_applies_and_acknowledges_the_tutorial_update(tutorial, tmp_path, sim, registry):
    keys = create_module_with_tutorial(tutorial, tmp_path, sim)
    module_connstr = ModuleIdentity(DEVICE_ID, MODULE_ID, keys["module"]).connection_string()
    update_path = write_program(
        tmp_path,
        "UpdateModuleTwinDesiredProperties.py",
        tutorial["UpdateModuleTwinDesiredProperties.py"],
        sim.service_connstr,
    )
    daemon = Daemon(daemon_config(tmp_path, module_connstr, sim.ca_path))
    try:
        wait_until_connected(registry, DEVICE_ID, MODULE_ID)
        update_output = run_service_program(update_path, sim.ca_path)
        after = section_after(update_output, "Module twin properties after update")
        assert "'telemetryInterval': 122" in after, update_output

        ack = wait_for_ack(registry, DEVICE_ID, MODULE_ID, "telemetryInterval", 122, daemon)
        desired = registry.get_module_twin(DEVICE_ID, MODULE_ID).properties.desired
        assert ack["av"] == desired["$version"]
    finally:
        status = daemon.stop()
    assert status == 0, f"edgetwin run exited with {status} after SIGTERM:\n{daemon.log()}"
    log = daemon.log()
    assert keys["module"] not in log and "SharedAccessSignature" not in log, "log leaks a secret"


def test_twin_set_reaches_the_tutorial_receiver(tutorial, tmp_path, sim, registry):
    keys = create_module_with_tutorial(tutorial, tmp_path, sim)
    module_connstr = ModuleIdentity(DEVICE_ID, MODULE_ID, keys["module"]).connection_string()
    receiver_path = write_program(
        tmp_path,
        "ReceiveModuleTwinDesiredPropertiesPatch.py",
        tutorial["ReceiveModuleTwinDesiredPropertiesPatch.py"],
        module_connstr,
    )
    receiver = Receiver(receiver_path, sim.ca_path)
    try:
        wait_until_connected(registry, DEVICE_ID, MODULE_ID)
        result = run_edgetwin(
            "twin", "set",
            "--device", DEVICE_ID,
            "--module", MODULE_ID,
            "--ca-file", str(sim.ca_path),
            "telemetryInterval=123",
            'limits={"cpu":80}',
            EDGETWIN_SERVICE_CONNECTION_STRING=sim.service_connstr,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        printed = result.stdout.strip()
        assert printed.startswith("desired $version "), printed
        version = int(printed.rsplit(" ", 1)[1])

        patch = receiver.wait_for_patch(
            lambda line: f"'$version': {version}" in line,
            f"the patch of desired $version {version}",
        )
        assert "'telemetryInterval': 123" in patch, receiver.output()
        assert "'limits': {'cpu': 80}" in patch, receiver.output()
    finally:
        receiver.stop()


def test_provisioned_connection_string_works_in_the_python_module_client(
    sim, tmp_path, registry, module_clients
):
    device_id = unique_id("provisioned")
    state = tmp_path / "state"
    config = tmp_path / "edgetwin.toml"
    policy_file = sim.state_dir / "policies" / "registryReadWrite.connstr"
    assert policy_file.is_file(), f"the emulator wrote no {policy_file}"
    config.write_text(
        "[provisioning]\nmethod = \"service\"\n"
        f"service_connection_string_file = {toml_string(policy_file)}\n"
        f"device_id = {toml_string(device_id)}\n"
        'module_id = "edgetwin"\n\n'
        f"[state]\ndir = {toml_string(state)}\n",
        encoding="utf-8",
    )
    provision = ("provision", "--config", str(config), "--ca-file", str(sim.ca_path))
    first = run_edgetwin(*provision)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"device: {device_id} (created)" in first.stdout, first.stdout
    assert "module: edgetwin (created)" in first.stdout, first.stdout
    credential = state / "module.connstr"
    connstr = credential.read_text(encoding="utf-8").strip()
    assert (credential.stat().st_mode & 0o777) == 0o600
    key = connstr.rsplit("SharedAccessKey=", 1)[1]
    assert key not in first.stdout + first.stderr, "provision printed the key"

    second = run_edgetwin(*provision)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(existing)" in second.stdout, second.stdout
    assert credential.read_text(encoding="utf-8").strip() == connstr

    hub_module = registry.get_module(device_id, "edgetwin")
    assert hub_module.authentication.symmetric_key.primary_key == key

    client = module_clients(connstr, server_verification_cert=sim.ca_pem)
    client.connect()
    twin = client.get_twin()
    assert "desired" in twin and "reported" in twin, twin
    client.patch_twin_reported_properties({"provisionedBy": "edgetwin"})
    reported = registry.get_module_twin(device_id, "edgetwin").properties.reported
    assert reported.get("provisionedBy") == "edgetwin", reported


def test_a_module_created_with_a_device_token_works_in_the_python_sdks(
    sim, tmp_path, registry, module_clients
):
    """`[provisioning] method = "device"`: only this device's key on the gateway. The
    module it creates (device-scoped token, keys derived from the generationId) is seen by
    the Python service SDK and its connection string works in the Python module client."""
    device_id = unique_id("devicekey")
    device = registry.create_device_with_sas(device_id, None, None, "enabled")
    device_key = device.authentication.symmetric_key.primary_key
    device_file = tmp_path / "device.connstr"
    # The REST port travels in HostName, as for the service connection strings.
    device_file.write_text(
        f"HostName=localhost:8443;DeviceId={device_id};SharedAccessKey={device_key}\n",
        encoding="utf-8",
    )
    state = tmp_path / "state"
    config = tmp_path / "edgetwin.toml"
    config.write_text(
        "[provisioning]\nmethod = \"device\"\n"
        f"device_connection_string_file = {toml_string(device_file)}\n"
        'module_id = "edgetwin"\n\n'
        f"[state]\ndir = {toml_string(state)}\n",
        encoding="utf-8",
    )
    done = run_edgetwin("provision", "--config", str(config), "--ca-file", str(sim.ca_path))
    assert done.returncode == 0, done.stdout + done.stderr
    connstr = (state / "module.connstr").read_text(encoding="utf-8").strip()
    key = connstr.rsplit("SharedAccessKey=", 1)[1]
    for secret in (key, device_key):
        assert secret not in done.stdout + done.stderr, "provision printed a key"

    hub_module = registry.get_module(device_id, "edgetwin")
    assert hub_module.authentication.symmetric_key.primary_key == key

    client = module_clients(connstr, server_verification_cert=sim.ca_pem)
    client.connect()
    client.patch_twin_reported_properties({"provisionedWith": "device key"})
    reported = registry.get_module_twin(device_id, "edgetwin").properties.reported
    assert reported.get("provisionedWith") == "device key", reported
