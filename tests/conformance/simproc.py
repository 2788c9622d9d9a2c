"""`edgetwin-sim serve` as a child process: start it, wait until it is ready, stop it cleanly.

The suite talks to the emulator only the way a user does: through the command line, the
files it writes into its state directory, and its network listeners.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tutorial_source import REPO_ROOT

READY_PREFIX = "edgetwin-sim ready"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class SimError(Exception):
    """The emulator could not be started, did not become ready, or did not stop cleanly."""


def _release_binary(env_var: str, name: str) -> Path:
    """`$env_var`, else the release build of `name` in this repository."""
    path = Path(os.environ.get(env_var, REPO_ROOT / "target" / "release" / name))
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SimError(
            f"{name} binary not found at {path}: run `cargo build --release --locked --workspace` "
            f"or set {env_var}"
        )
    return path


def edgetwin_binary() -> Path:
    """The daemon: `$EDGETWIN_BIN`, else target/release/edgetwin."""
    return _release_binary("EDGETWIN_BIN", "edgetwin")


def sim_binary() -> Path:
    """The emulator: `$EDGETWIN_SIM_BIN`, else target/release/edgetwin-sim."""
    return _release_binary("EDGETWIN_SIM_BIN", "edgetwin-sim")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if pytest dies, so no emulator outlives the suite."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class SimProcess:
    """One running `edgetwin-sim serve`."""

    mqtt: str
    https: str
    state_dir: Path
    hub_name: str = "localhost"
    process: subprocess.Popen | None = None
    stdout_lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def log_path(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}.stderr.log"

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "ca.pem"

    @property
    def ca_pem(self) -> str:
        return self.ca_path.read_text(encoding="ascii")

    @property
    def service_connstr(self) -> str:
        return self._read_connstr(self.state_dir / "service.connstr")

    @property
    def dps_id_scope(self) -> str:
        """The emulated DPS instance's ID scope (`dps/id_scope`)."""
        return self._read_connstr(self.state_dir / "dps" / "id_scope")

    @property
    def dps_group_key(self) -> str:
        """The key of its enrollment group (`dps/group.key`), base64."""
        return self._read_connstr(self.state_dir / "dps" / "group.key")

    @property
    def dps_endpoint(self) -> str:
        """`host:port` of its DPS REST endpoint (`dps/endpoint`)."""
        return self._read_connstr(self.state_dir / "dps" / "endpoint")

    def policy_connstr(self, policy: str) -> str:
        """Connection string of a shared access policy, e.g. `registryRead`."""
        return self._read_connstr(self.state_dir / "policies" / f"{policy}.connstr")

    @staticmethod
    def _read_connstr(path: Path) -> str:
        if not path.is_file():
            raise SimError(f"the emulator did not write {path}")
        return path.read_text(encoding="utf-8").strip()

    def start(self) -> None:
        binary = sim_binary()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(binary), "serve",
            "--mqtt", self.mqtt,
            "--https", self.https,
            "--hub-name", self.hub_name,
            "--state", str(self.state_dir),
        ]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        with open(self.log_path, "wb") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
                bufsize=1,
                preexec_fn=_die_with_parent,
            )
        threading.Thread(target=self._read_stdout, name="sim-stdout", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(timeout=0.1):
            if self.process.poll() is not None:
                self._ready.wait(timeout=1.0)  # let the reader drain what was printed
                raise SimError(
                    f"`{' '.join(command)}` exited with status {self.process.returncode} "
                    f"before printing '{READY_PREFIX}'.\n{self.diagnostics()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise SimError(
                    f"`{' '.join(command)}` printed no '{READY_PREFIX}' line within "
                    f"{START_TIMEOUT_S:.0f} s.\n{self.diagnostics()}"
                )
        for produced in (self.ca_path, self.state_dir / "service.connstr"):
            if not produced.is_file():
                raise SimError(f"the emulator is ready but did not write {produced}")

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if line.startswith(READY_PREFIX):
                self._ready.set()

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit status (killing it if it does not exit)."""
        if self.process is None:
            raise SimError("emulator was never started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                raise SimError(
                    f"the emulator did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM.\n"
                    f"{self.diagnostics()}"
                ) from None
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def diagnostics(self, lines: int = 40) -> str:
        stdout = "\n".join(self.stdout_lines[-lines:]) or "(nothing)"
        try:
            stderr_lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            stderr = "\n".join(stderr_lines[-lines:]) or "(nothing)"
        except OSError:
            stderr = "(no log)"
        return f"--- emulator stdout ---\n{stdout}\n--- emulator stderr (tail) ---\n{stderr}"
