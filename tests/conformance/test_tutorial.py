"""The tutorial's three programs, as Microsoft wrote them, against `edgetwin-sim serve`.

Each program is extracted from the seed document at test time and changed only on its
`CONNECTION_STRING = "..."` line. CA trust comes from the environment, so the code is
untouched: `SSL_CERT_FILE` for the device program (the device SDK loads the default
verify paths when given no certificate) and `REQUESTS_CA_BUNDLE` for the service programs
(msrest uses requests, which honours it). `PYTHONUNBUFFERED=1` lets us read the receiver's
prints while it runs.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hub_helpers import ModuleIdentity, next_matching
from tutorial_source import load_programs, with_connection_string

DEVICE_ID = "myFirstDevice"
MODULE_ID = "myFirstModule"
PROGRAM_TIMEOUT_S = 60
PATCH_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 30
PATCH_HEADING = "Twin desired properties patch received:"

KEY_LINES = {
    "device": re.compile(rf"^device <{DEVICE_ID}> has primary key = (\S+)$", re.M),
    "module": re.compile(rf"^device/module <{DEVICE_ID}/{MODULE_ID}> has primary key = (\S+)$", re.M),
}


@pytest.fixture(scope="module")
def programs() -> dict[str, str]:
    return load_programs()


def write_program(directory: Path, name: str, code: str, connection_string: str) -> Path:
    path = directory / name
    path.write_text(with_connection_string(code, connection_string), encoding="utf-8")
    return path


def program_env(**trust: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(trust)
    return env


def run_service_program(path: Path, ca_path: Path) -> str:
    """Run a service-side program to completion and return what it printed."""
    result = subprocess.run(
        [sys.executable, str(path)],
        env=program_env(REQUESTS_CA_BUNDLE=str(ca_path)),
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{path.name} exited with {result.returncode}:\n{output}"
    # The tutorial catches every exception and prints it instead of failing.
    assert "Unexpected error" not in output, f"{path.name} failed:\n{output}"
    return result.stdout


def printed_keys(output: str) -> dict[str, str]:
    """The device and module primary keys CreateModule.py printed."""
    keys = {}
    for kind, pattern in KEY_LINES.items():
        found = pattern.findall(output)
        assert len(found) == 1, f"CreateModule.py printed no single {kind} key line:\n{output}"
        keys[kind] = found[0]
    return keys


def create_module_with_tutorial(programs, tmp_path: Path, sim) -> dict[str, str]:
    path = write_program(tmp_path, "CreateModule.py", programs["CreateModule.py"], sim.service_connstr)
    return printed_keys(run_service_program(path, sim.ca_path))


class Receiver:
    """ReceiveModuleTwinDesiredPropertiesPatch.py running in the background."""

    def __init__(self, path: Path, ca_path: Path):
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.transcript: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(path)],
            env=program_env(SSL_CERT_FILE=str(ca_path)),
            cwd=path.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.transcript.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for_line(self, accept, timeout: float, what: str) -> str:
        def accept_or_exit(line):
            if line is None:
                raise AssertionError(f"the receiver exited while waiting for {what}:\n{self.output()}")
            return accept(line)

        try:
            return next_matching(self.lines, accept_or_exit, timeout, what)
        except AssertionError as error:
            raise AssertionError(f"{error}\nreceiver output:\n{self.output()}") from None

    def wait_for_patch(self, accept, what: str) -> str:
        """The next printed patch that `accept`s.

        The SDK delivers the twin's current desired properties as a first "patch" when the
        receiver subscribes (ensure_desired_properties), so earlier patches are passed over.
        """
        previous = None

        def accept_patch(line: str) -> bool:
            nonlocal previous
            is_patch = previous == PATCH_HEADING
            previous = line
            return is_patch and accept(line)

        return self.wait_for_line(accept_patch, PATCH_TIMEOUT_S, what)

    def output(self) -> str:
        return "\n".join(self.transcript)

    def stop(self) -> None:
        """Ctrl-C, as the tutorial says; killed if it does not exit promptly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_until_connected(registry, device_id: str, module_id: str) -> None:
    """Until the hub reports the module connected (the service side's view of it).

    The receiver subscribes to desired patches right after its CONNACK, long before the
    update program (a fresh Python process importing the service SDK) sends its PATCH.
    """
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    state = None
    while time.monotonic() < deadline:
        state = registry.get_module_twin(device_id, module_id).connection_state
        if state == "Connected":
            return
        time.sleep(0.1)
    raise AssertionError(
        f"module twin connectionState is {state!r}, not 'Connected', {CONNECT_TIMEOUT_S} s "
        "after starting the receiver"
    )


def section_after(output: str, heading: str) -> str:
    assert heading in output, f"program printed no '{heading}':\n{output}"
    return output.split(heading, 1)[1]


def test_create_module_twice_prints_the_same_keys(programs, tmp_path, sim, registry):
    first = create_module_with_tutorial(programs, tmp_path, sim)
    second = create_module_with_tutorial(programs, tmp_path, sim)  # takes the 409 path

    assert second == first
    module = registry.get_module(DEVICE_ID, MODULE_ID)
    assert module.authentication.symmetric_key.primary_key == first["module"]
    device = registry.get_device(DEVICE_ID)
    assert device.authentication.symmetric_key.primary_key == first["device"]


def test_receiver_gets_the_patch_the_update_program_sends(programs, tmp_path, sim, registry):
    keys = create_module_with_tutorial(programs, tmp_path, sim)
    module_connstr = ModuleIdentity(DEVICE_ID, MODULE_ID, keys["module"]).connection_string()
    receiver_path = write_program(
        tmp_path,
        "ReceiveModuleTwinDesiredPropertiesPatch.py",
        programs["ReceiveModuleTwinDesiredPropertiesPatch.py"],
        module_connstr,
    )
    update_path = write_program(
        tmp_path,
        "UpdateModuleTwinDesiredProperties.py",
        programs["UpdateModuleTwinDesiredProperties.py"],
        sim.service_connstr,
    )

    receiver = Receiver(receiver_path, sim.ca_path)
    try:
        wait_until_connected(registry, DEVICE_ID, MODULE_ID)
        update_output = run_service_program(update_path, sim.ca_path)

        after = section_after(update_output, "Module twin properties after update")
        assert "'telemetryInterval': 122" in after, update_output

        patch = receiver.wait_for_patch(
            lambda patch: "'telemetryInterval': 122" in patch, "a patch with telemetryInterval 122"
        )
        assert "'$version':" in patch, receiver.output()
    finally:
        receiver.stop()
