"""Small helpers over Microsoft's SDKs shared by the conformance tests."""

from __future__ import annotations

import contextlib
import logging
import queue
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties


def registry_manager(connection_string: str, ca_path: str) -> IoTHubRegistryManager:
    """A service client that trusts the emulator's CA (same effect as REQUESTS_CA_BUNDLE)."""
    manager = IoTHubRegistryManager.from_connection_string(connection_string)
    manager.protocol.config.connection.verify = str(ca_path)
    return manager


@dataclass(frozen=True)
class ModuleIdentity:
    device_id: str
    module_id: str
    primary_key: str
    gateway: str = "localhost"

    def connection_string(self, key: str | None = None) -> str:
        """Module connection string as the portal shows it; `key` overrides the real key."""
        return (
            f"HostName={self.gateway};DeviceId={self.device_id};"
            f"ModuleId={self.module_id};SharedAccessKey={key or self.primary_key}"
        )


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_module(manager: IoTHubRegistryManager, prefix: str) -> ModuleIdentity:
    """A fresh device with one module, both with hub-generated keys."""
    device_id = unique_id(prefix)
    module_id = "mod"
    manager.create_device_with_sas(device_id, None, None, "enabled")
    module = manager.create_module_with_sas(device_id, module_id, None, None, None)
    primary = module.authentication.symmetric_key.primary_key
    assert primary, f"hub returned no primary key for {device_id}/{module_id}"
    return ModuleIdentity(device_id, module_id, primary)


def next_matching(
    source: "queue.Queue[Any]",
    accept: Callable[[Any], bool],
    timeout: float,
    what: str,
) -> Any:
    """The first item from `source` that `accept`s, within `timeout` seconds in total.

    Items that are not accepted are kept in the failure message, which says what was
    awaited and what arrived instead.
    """
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; got instead: {seen!r}")
        try:
            item = source.get(timeout=remaining)
        except queue.Empty:
            continue
        if accept(item):
            return item
        seen.append(item)


def desired_patch(desired: dict[str, Any]) -> Twin:
    return Twin(properties=TwinProperties(desired=desired))


@contextlib.contextmanager
def log_records(logger_name: str, containing: str) -> Iterator["queue.Queue[logging.LogRecord]"]:
    """A queue of the records `logger_name` emits at INFO or above whose message contains `containing`.

    Used to observe what the SDK does internally (e.g. renewing its SAS token) as events.
    """
    records: "queue.Queue[logging.LogRecord]" = queue.Queue()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if containing in record.getMessage():
                records.put(record)

    logger = logging.getLogger(logger_name)
    handler = Collect(level=logging.INFO)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
