"""Microsoft's SDKs (azure-iot-device 2.14.0, azure-iot-hub 2.7.0) beyond the tutorial.

Each test uses its own device and module on the session emulator, so the tests do not
depend on one another. Waiting is done on events (queues fed by SDK handlers, or blocking
SDK calls) with a timeout, never on a fixed sleep.
"""

from __future__ import annotations

import base64
import os
import queue

import pytest
from azure.iot.device import MethodResponse
from azure.iot.device.exceptions import CredentialError
from azure.iot.hub.models import CloudToDeviceMethod
from msrest.exceptions import HttpOperationError

from hub_helpers import (
    create_module,
    desired_patch,
    log_records,
    next_matching,
    registry_manager,
    unique_id,
)

# The SDK renews its SAS token 120 s before expiry (SasTokenStage.DEFAULT_TOKEN_UPDATE_MARGIN),
# so a 128 s lifetime means a renewal, and a reconnect with the new token, every ~8 s.
SAS_RENEWAL_MARGIN_S = 120
SHORT_SASTOKEN_TTL_S = SAS_RENEWAL_MARGIN_S + 8
RENEWALS_TO_OBSERVE = 2
SAS_STAGE_LOGGER = "azure.iot.device.common.pipeline.pipeline_stages_base"

EVENT_TIMEOUT_S = 15


def connected_client(module_clients, identity, ca_pem: str, **kwargs):
    client = module_clients(identity.connection_string(), server_verification_cert=ca_pem, **kwargs)
    client.connect()
    return client


def receive_patches_into(client) -> "queue.Queue[dict]":
    """Desired-property patches as they arrive; returns once the SDK has subscribed."""
    patches: "queue.Queue[dict]" = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    return patches


def test_desired_patches_keep_arriving_across_sas_token_renewals(
    sim, registry, new_module, module_clients
):
    identity = new_module("renewal")
    # Without the SDK's catch-up twin GET after each reconnect, a patch can only arrive
    # through the subscription the hub kept from before the renewal (persistent session).
    client = connected_client(
        module_clients,
        identity,
        sim.ca_pem,
        sastoken_ttl=SHORT_SASTOKEN_TTL_S,
        ensure_desired_properties=False,
    )
    connection_changes: "queue.Queue[bool]" = queue.Queue()
    client.on_connection_state_change = lambda: connection_changes.put(client.connected)
    patches = receive_patches_into(client)

    with log_records(SAS_STAGE_LOGGER, "Renewing SAS Token") as renewals:
        for renewal in range(1, RENEWALS_TO_OBSERVE + 1):
            next_matching(
                renewals,
                lambda _: True,
                SHORT_SASTOKEN_TTL_S - SAS_RENEWAL_MARGIN_S + EVENT_TIMEOUT_S,
                f"SAS token renewal #{renewal}",
            )
            # Re-authentication is a disconnect followed by a connect with the new token.
            next_matching(connection_changes, lambda _: True, EVENT_TIMEOUT_S, "disconnect to re-authenticate")
            next_matching(connection_changes, lambda _: True, EVENT_TIMEOUT_S, "reconnect with the renewed token")
            assert client.connected, f"client not connected after renewal #{renewal}"

            registry.update_module_twin(
                identity.device_id, identity.module_id, desired_patch({"renewal": renewal})
            )
            patch = next_matching(
                patches,
                lambda p, r=renewal: p.get("renewal") == r,
                EVENT_TIMEOUT_S,
                f"the desired patch sent after renewal #{renewal}",
            )
            assert isinstance(patch.get("$version"), int), patch


def test_websocket_transport_connects_and_exchanges_twin_updates(websocket_sim, module_clients):
    registry = registry_manager(websocket_sim.service_connstr, websocket_sim.ca_path)
    identity = create_module(registry, "websocket")
    client = connected_client(module_clients, identity, websocket_sim.ca_pem, websockets=True)
    patches = receive_patches_into(client)

    registry.update_module_twin(identity.device_id, identity.module_id, desired_patch({"viaWebSocket": True}))
    patch = next_matching(patches, lambda p: "viaWebSocket" in p, EVENT_TIMEOUT_S, "the desired patch over WebSocket")
    assert patch["viaWebSocket"] is True

    client.patch_twin_reported_properties({"transport": "websocket"})
    reported = registry.get_module_twin(identity.device_id, identity.module_id).properties.reported
    assert reported["transport"] == "websocket"


def test_direct_method_reaches_the_module_handler_and_its_response_returns(
    sim, registry, new_module, module_clients
):
    identity = new_module("method")
    client = connected_client(module_clients, identity, sim.ca_pem)
    requests: "queue.Queue[tuple[str, object]]" = queue.Queue()

    def on_method(request):
        requests.put((request.name, request.payload))
        response = MethodResponse.create_from_method_request(request, 201, {"accepted": request.payload})
        client.send_method_response(response)

    client.on_method_request_received = on_method  # returns once subscribed

    result = registry.invoke_device_module_method(
        identity.device_id,
        identity.module_id,
        CloudToDeviceMethod(
            method_name="setInterval",
            payload={"seconds": 7},
            response_timeout_in_seconds=30,
            connect_timeout_in_seconds=5,
        ),
    )

    assert requests.get_nowait() == ("setInterval", {"seconds": 7})
    assert result.status == 201
    assert result.payload == {"accepted": {"seconds": 7}}


def test_connecting_with_a_wrong_key_raises_credential_error(sim, new_module, module_clients):
    identity = new_module("wrongkey")
    wrong_key = base64.b64encode(os.urandom(32)).decode()
    assert wrong_key != identity.primary_key
    client = module_clients(identity.connection_string(key=wrong_key), server_verification_cert=sim.ca_pem)

    with pytest.raises(CredentialError):
        client.connect()
    assert not client.connected


def test_twin_update_with_a_stale_etag_fails_with_412(registry, new_module):
    identity = new_module("etag")
    stale_etag = registry.get_module_twin(identity.device_id, identity.module_id).etag

    updated = registry.update_module_twin(
        identity.device_id, identity.module_id, desired_patch({"setting": 1}), stale_etag
    )
    assert updated.etag != stale_etag

    with pytest.raises(HttpOperationError) as refused:
        registry.update_module_twin(
            identity.device_id, identity.module_id, desired_patch({"setting": 2}), stale_etag
        )
    assert refused.value.response.status_code == 412

    desired = registry.get_module_twin(identity.device_id, identity.module_id).properties.desired
    assert desired["setting"] == 1


def test_reported_properties_from_the_module_appear_in_the_service_twin(
    sim, registry, new_module, module_clients
):
    identity = new_module("reported")
    before = registry.get_module_twin(identity.device_id, identity.module_id).properties.reported
    client = connected_client(module_clients, identity, sim.ca_pem)

    client.patch_twin_reported_properties({"firmware": "1.2.3", "telemetry": {"interval": 5}})

    after = registry.get_module_twin(identity.device_id, identity.module_id).properties.reported
    assert after["firmware"] == "1.2.3"
    assert after["telemetry"] == {"interval": 5}
    assert after["$version"] == before["$version"] + 1
    assert client.get_twin()["reported"]["firmware"] == "1.2.3"


def test_registry_read_policy_can_read_devices_but_not_create_them(sim, registry, new_module):
    existing = new_module("policy")
    reader = registry_manager(sim.policy_connstr("registryRead"), sim.ca_path)

    assert reader.get_device(existing.device_id).device_id == existing.device_id

    denied_id = unique_id("denied")
    with pytest.raises(HttpOperationError) as refused:
        reader.create_device_with_sas(denied_id, None, None, "enabled")
    assert refused.value.response.status_code == 401

    with pytest.raises(HttpOperationError) as missing:
        registry.get_device(denied_id)
    assert missing.value.response.status_code == 404
