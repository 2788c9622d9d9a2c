"""Microsoft's `ProvisioningDeviceClient` (azure-iot-device 2.14.0) against the emulated DPS.

The SDK speaks DPS over MQTT and, like the device client, always dials port 8883 of
`provisioning_host`; the session emulator's MQTT listener is 127.0.0.1:8883, so
`provisioning_host="localhost"` reaches it and `server_verification_cert` trusts its CA. The
ID scope and the enrollment group's key are what the emulator wrote into `dps/` of its
state directory; the device key is derived from the group key exactly as Microsoft's
sample `provision_symmetric_key_group.py` does (PROTOCOL.md §12.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from azure.iot.device import ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError, ServiceError
from msrest.exceptions import HttpOperationError

from hub_helpers import unique_id


def derive_device_key(group_key: str, registration_id: str) -> str:
    """base64(HMAC-SHA256(base64decode(group key), registration id)), as Microsoft's sample."""
    signature = hmac.HMAC(
        base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256
    )
    return base64.b64encode(signature.digest()).decode("utf-8")


def provisioning_client(sim, registration_id: str, key: str) -> ProvisioningDeviceClient:
    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=sim.dps_id_scope,
        symmetric_key=key,
        server_verification_cert=sim.ca_pem,
    )


def test_dps_provisioning_client_registers_with_a_group_derived_key(sim, registry):
    registration_id = unique_id("dps-gw")
    device_key = derive_device_key(sim.dps_group_key, registration_id)
    client = provisioning_client(sim, registration_id, device_key)

    result = client.register()

    assert result.status == "assigned", result
    state = result.registration_state
    assert state.assigned_hub == sim.hub_name
    assert state.device_id == registration_id
    assert state.sub_status == "initialAssignment"
    assert result.operation_id
    # The service SDK sees the device DPS created, holding the derived key.
    device = registry.get_device(registration_id)
    assert device.status == "enabled"
    assert device.authentication.symmetric_key.primary_key == device_key


def test_dps_registration_with_a_wrong_key_fails_with_401(sim, registry):
    registration_id = unique_id("dps-bad")
    wrong_key = derive_device_key(sim.dps_group_key, registration_id + "-not")
    client = provisioning_client(sim, registration_id, wrong_key)
    try:
        # The SDK wraps the service's answer: ClientError caused by ServiceError(... 401).
        with pytest.raises(ClientError) as raised:
            client.register()
        cause = raised.value.__cause__
        assert isinstance(cause, ServiceError) and "401" in str(cause), repr(cause)
    finally:
        # A failed registration leaves the SDK's pipeline connected; close it.
        client._pipeline.shutdown(callback=lambda error=None: None)
    with pytest.raises(HttpOperationError):
        registry.get_device(registration_id)
