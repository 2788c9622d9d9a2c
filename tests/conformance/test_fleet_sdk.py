"""Fleet APIs of Microsoft's service SDK (azure-iot-hub) against the emulator (issue 12).

`IoTHubConfigurationManager` creates, reads, lists, updates and deletes an automatic module
configuration whose content reaches the targeted module twin, and
`IoTHubRegistryManager.query_iot_hub` pages through module twins with a page size smaller
than the result, following the continuation token (PROTOCOL.md §14.1, §14.3).
"""

from __future__ import annotations

import pytest
from azure.iot.hub import IoTHubConfigurationManager
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    QuerySpecification,
    Twin,
)
from msrest.exceptions import HttpOperationError

from hub_helpers import unique_id


@pytest.fixture
def configurations(sim) -> IoTHubConfigurationManager:
    manager = IoTHubConfigurationManager.from_connection_string(sim.service_connstr)
    manager.protocol.config.connection.verify = str(sim.ca_path)
    return manager


def tag_fleet(registry, new_module, fleet: str, count: int) -> list[str]:
    """`count` fresh modules tagged `fleet`; returns their device ids, sorted."""
    devices = []
    for _ in range(count):
        identity = new_module("fleet")
        registry.update_module_twin(
            identity.device_id, identity.module_id, Twin(tags={"fleet": fleet}), "*"
        )
        devices.append(identity.device_id)
    return sorted(devices)


def module_configuration(config_id: str, fleet: str, interval: int, priority: int) -> Configuration:
    return Configuration(
        id=config_id,
        schema_version="1.0",
        labels={"by": "conformance"},
        content=ConfigurationContent(
            module_content={"properties.desired.telemetryInterval": interval}
        ),
        target_condition=f"FROM devices.modules WHERE moduleId = 'mod' AND tags.fleet = '{fleet}'",
        priority=priority,
        metrics=ConfigurationMetrics(
            queries={
                "applied": "SELECT deviceId, moduleId FROM devices.modules WHERE "
                f"configurations.[[{config_id}]].status = 'Applied'"
            }
        ),
        etag="*",
    )


def test_configuration_manager_creates_gets_lists_updates_and_deletes(
    configurations, registry, new_module
):
    fleet = unique_id("f")
    devices = tag_fleet(registry, new_module, fleet, 2)
    config_id = unique_id("interval")

    created = configurations.create_configuration(
        module_configuration(config_id, fleet, 42, priority=5)
    )
    assert created.id == config_id
    assert created.priority == 5
    assert created.content.module_content == {"properties.desired.telemetryInterval": 42}
    assert created.created_time_utc is not None
    assert created.etag

    got = configurations.get_configuration(config_id)
    assert got.target_condition.endswith(f"tags.fleet = '{fleet}'")
    assert got.system_metrics.results == {"targetedCount": 2, "appliedCount": 2}
    assert got.metrics.results == {"applied": 2}
    for device in devices:
        twin = registry.get_module_twin(device, "mod")
        assert twin.properties.desired["telemetryInterval"] == 42

    listed = configurations.get_configurations(100)
    assert config_id in [c.id for c in listed]
    assert len(configurations.get_configurations(1)) == 1

    got.priority = 9
    updated = configurations.update_configuration(got, got.etag)
    assert updated.priority == 9
    assert updated.etag != got.etag

    got.content = ConfigurationContent(
        module_content={"properties.desired.telemetryInterval": 7}
    )
    with pytest.raises(HttpOperationError) as immutable:
        configurations.update_configuration(got, f'"{updated.etag}"')
    assert immutable.value.response.status_code == 400
    assert immutable.value.response.headers["iothub-errorcode"] == (
        "CannotModifyImmutableConfigurationContent"
    )

    configurations.delete_configuration(config_id)
    with pytest.raises(HttpOperationError) as missing:
        configurations.get_configuration(config_id)
    assert missing.value.response.status_code == 404
    # Deleting a configuration leaves the values it set.
    twin = registry.get_module_twin(devices[0], "mod")
    assert twin.properties.desired["telemetryInterval"] == 42


def test_an_invalid_target_condition_is_refused_with_the_hubs_error(configurations):
    config = module_configuration(unique_id("bad"), "x", 1, priority=1)
    config.target_condition = "tags.fleet = 'x'"
    with pytest.raises(HttpOperationError) as refused:
        configurations.create_configuration(config)
    assert refused.value.response.status_code == 400
    assert refused.value.response.headers["iothub-errorcode"] == (
        "InvalidConfigurationTargetCondition"
    )


def test_query_iot_hub_pages_through_module_twins_with_continuation(registry, new_module):
    fleet = unique_id("q")
    devices = tag_fleet(registry, new_module, fleet, 5)
    spec = QuerySpecification(
        query=f"SELECT * FROM devices.modules WHERE tags.fleet = '{fleet}'"
    )

    seen, pages, token = [], 0, None
    while True:
        result = registry.query_iot_hub(spec, token, 2)
        pages += 1
        assert result.type == "twin"
        assert len(result.items) <= 2
        seen.extend(twin.device_id for twin in result.items)
        assert all(twin.module_id == "mod" for twin in result.items)
        token = result.continuation_token
        if not token:
            break
        assert pages < 10, "continuation never ends"
    assert pages == 3
    assert sorted(seen) == devices

    count = registry.query_iot_hub(
        QuerySpecification(
            query=f"SELECT COUNT() AS n FROM devices.modules WHERE tags.fleet = '{fleet}'"
        )
    )
    assert count.continuation_token is None


def test_a_malformed_query_raises_with_a_400(registry):
    with pytest.raises(HttpOperationError) as refused:
        registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices.modules WHERE"))
    assert refused.value.response.status_code == 400
