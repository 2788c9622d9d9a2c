"""Fixtures for the conformance suite: a real `edgetwin-sim serve` and clients of Microsoft's SDKs.

One emulator serves the whole session on the ports Microsoft's device SDK hard-codes for
MQTT (127.0.0.1:8883) and on 127.0.0.1:8443 for REST. Tests that need MQTT over WebSocket
start a second emulator whose HTTPS listener is on 127.0.0.1:443, because the SDK's
`websockets=True` always dials port 443 (see README.md in this directory).

This suite never skips: a missing binary, seed document or bindable port is an error, and
any skipped test turns the session's exit status into a failure.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import pytest
from azure.iot.device import IoTHubModuleClient

from hub_helpers import ModuleIdentity, create_module, registry_manager
from simproc import SimError, SimProcess

MQTT_ADDR = "127.0.0.1:8883"
HTTPS_ADDR = "127.0.0.1:8443"
WEBSOCKET_HTTPS_ADDR = "127.0.0.1:443"


@contextlib.contextmanager
def running_sim(state_dir: Path, mqtt: str, https: str) -> Iterator[SimProcess]:
    """An emulator for the duration of the block; it must exit 0 on SIGTERM afterwards."""
    sim = SimProcess(mqtt=mqtt, https=https, state_dir=state_dir)
    failure = None
    try:
        sim.start()
    except SimError as error:
        failure = f"cannot start edgetwin-sim on {mqtt} and {https}: {error}"
    if failure is not None:
        sim.kill()
        pytest.fail(failure, pytrace=False)
    try:
        yield sim
    finally:
        failure = None
        try:
            status = sim.stop()
        except SimError as error:
            failure = str(error)
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        if status != 0:
            pytest.fail(
                f"edgetwin-sim exited with status {status} after SIGTERM (expected 0).\n"
                f"{sim.diagnostics()}",
                pytrace=False,
            )


@pytest.fixture(scope="session")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    state_dir = tmp_path_factory.mktemp("sim") / "state"
    with running_sim(state_dir, MQTT_ADDR, HTTPS_ADDR) as process:
        yield process


@pytest.fixture(scope="module")
def websocket_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """A second emulator whose HTTPS (and so WebSocket) listener is on port 443.

    Binding 443 needs root or CAP_NET_BIND_SERVICE; CI runs as root. Its MQTT listener
    takes any free port, since the session emulator holds 8883.
    """
    state_dir = tmp_path_factory.mktemp("sim-ws") / "state"
    with running_sim(state_dir, "127.0.0.1:0", WEBSOCKET_HTTPS_ADDR) as process:
        yield process


@pytest.fixture(scope="session")
def registry(sim: SimProcess):
    """`IoTHubRegistryManager` with the emulator's iothubowner connection string."""
    return registry_manager(sim.service_connstr, sim.ca_path)


@pytest.fixture
def new_module(registry) -> Callable[[str], ModuleIdentity]:
    """Factory: a fresh device/module pair on the session emulator."""
    return lambda prefix: create_module(registry, prefix)


@pytest.fixture
def module_clients() -> Iterator[Callable[..., IoTHubModuleClient]]:
    """Factory for `IoTHubModuleClient`s that are all shut down at the end of the test."""
    created: list[IoTHubModuleClient] = []

    def make(connection_string: str, **kwargs) -> IoTHubModuleClient:
        client = IoTHubModuleClient.create_from_connection_string(connection_string, **kwargs)
        created.append(client)
        return client

    yield make
    for client in created:
        client.shutdown()


# --- a skipped conformance test is a failed conformance test -------------------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _skipped:
        terminalreporter.write_line(
            "conformance: skipped tests count as failures: " + ", ".join(_skipped), red=True
        )
