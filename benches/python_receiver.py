"""The Python side of `cargo bench --bench twin`: the tutorial's module-twin receiver on
azure-iot-device 2.14, extended the way a real module must be to be comparable with edgetwin.

Like the tutorial's ReceiveModuleTwinDesiredPropertiesPatch.py it runs a listener thread
that blocks on `receive_twin_desired_properties_patch()`. Extended:

- its handler patches the reported property back as an IoT Plug and Play acknowledgement
  (`{"telemetryInterval": {"value": v, "ac": 200, "av": $version, "ad": "applied"}}`), the
  same shape edgetwin reports, so the bench matches both acks with one rule;
- when the connection comes back after a drop it reads the full twin and acknowledges its
  desired `$version` (the SDK re-subscribes, but patches sent while it was away are lost);
- it connects explicitly and prints `ready` once connected.

It keeps no durable state: nothing is written to disk before the ack (edgetwin fsyncs its
state before each ack). Configuration is by environment, so nothing secret is on the
command line:

    BENCH_CONNECTION_STRING   module connection string (HostName=localhost;...)
    SSL_CERT_FILE             the emulator's CA (the SDK dials HostName:8883)
    BENCH_RETRY_INTERVAL      seconds between reconnect attempts (SDK default 10)
    BENCH_SASTOKEN_TTL        SAS token lifetime in seconds (SDK default 3600; the SDK
                              renews by reconnecting 120 s before expiry)
    BENCH_RESYNC              0: no twin read of our own after a reconnect (the SDK as
                              shipped, for `cargo bench --bench idle`); default 1
"""

import os
import sys
import threading
import time

from azure.iot.device import IoTHubModuleClient

CONNECTION_STRING = os.environ["BENCH_CONNECTION_STRING"]
RETRY_INTERVAL = int(os.environ.get("BENCH_RETRY_INTERVAL", "10"))
SASTOKEN_TTL = int(os.environ.get("BENCH_SASTOKEN_TTL", "3600"))
RESYNC = os.environ.get("BENCH_RESYNC", "1") != "0"
PROPERTY = "telemetryInterval"

acked_lock = threading.Lock()
acked_version = 0


def acknowledge(client, value, version):
    """Reports the PnP ack of `version` unless a newer one was already acknowledged."""
    global acked_version
    with acked_lock:
        if version <= acked_version:
            return
        acked_version = version
    client.patch_twin_reported_properties(
        {PROPERTY: {"value": value, "ac": 200, "av": version, "ad": "applied"}}
    )


def twin_update_listener(client):
    while True:
        patch = client.receive_twin_desired_properties_patch()  # blocking call
        if PROPERTY in patch:
            acknowledge(client, patch[PROPERTY], patch["$version"])


def resync(client):
    twin = client.get_twin()
    desired = twin["desired"]
    if PROPERTY in desired:
        acknowledge(client, desired[PROPERTY], desired["$version"])


def iothub_client_sample_run():
    module_client = IoTHubModuleClient.create_from_connection_string(
        CONNECTION_STRING,
        connection_retry_interval=RETRY_INTERVAL,
        sastoken_ttl=SASTOKEN_TTL,
    )
    was_connected = [False]

    def on_connection_state_change():
        if RESYNC and module_client.connected and was_connected[0]:
            # The handler may not block the SDK's handler thread for long: resync beside it.
            threading.Thread(target=resync, args=(module_client,), daemon=True).start()
        was_connected[0] = was_connected[0] or module_client.connected

    module_client.on_connection_state_change = on_connection_state_change
    module_client.connect()
    was_connected[0] = True

    twin_update_listener_thread = threading.Thread(
        target=twin_update_listener, args=(module_client,)
    )
    twin_update_listener_thread.daemon = True
    twin_update_listener_thread.start()
    print("ready", flush=True)

    try:
        while True:
            time.sleep(1000000)
    except KeyboardInterrupt:
        pass
    finally:
        module_client.shutdown()


if __name__ == "__main__":
    try:
        iothub_client_sample_run()
    except KeyboardInterrupt:
        sys.exit(0)
