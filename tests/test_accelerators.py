"""Accelerator plugins: mock devices from config, the NVIDIA plugin on whatever this host has."""

from __future__ import annotations

import logging
import os
from decimal import Decimal

import pytest

from backendai_jupyter.agent.accelerators.base import load_plugins
from backendai_jupyter.agent.accelerators.mock import MockPlugin
from backendai_jupyter.agent.accelerators.nvidia import NvidiaPlugin, sysfs_pci_name
from backendai_jupyter.agent.launch import DeviceGrant, Mount
from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.wire import Device

GiB = 2**30
MiB = 2**20

TWO_DECLARED = {
    "devices": [
        {"id": "0", "model": "Mock A100", "memory": "40g", "numa_node": 0, "pci_bus": "0000:01:00.0"},
        {"id": "1", "model": "Mock A100", "memory": "40g", "numa_node": 1, "pci_bus": "0000:81:00.0"},
    ],
    "agent_id": "agent-a",
}


def gpus(*ids: str, shares: str = "0") -> list[Device]:
    """Hand-made NVIDIA devices, as discovery would report them."""
    return [
        Device(plugin="cuda", id=i, uuid=f"GPU-{i}-uuid", model="NVIDIA H100", memory=80 * GiB, shares=shares)
        for i in ids
    ]


# -- mock discovery ------------------------------------------------------------------------------


async def test_mock_devices_from_a_list_are_labelled_mock():
    devices = await MockPlugin(TWO_DECLARED).discover()
    assert [d.id for d in devices] == ["0", "1"]
    assert all(d.mock and d.plugin == "cuda" for d in devices)
    assert [d.model for d in devices] == ["Mock A100"] * 2  # already says mock: no second label
    assert [d.memory for d in devices] == [40 * GiB] * 2
    assert [d.numa_node for d in devices] == [0, 1]
    assert [d.pci_bus for d in devices] == ["0000:01:00.0", "0000:81:00.0"]
    assert [d.uuid for d in devices] == ["GPU-mock-agent-a-0", "GPU-mock-agent-a-1"]


async def test_mock_device_count_gives_16g_devices_on_alternating_numa_nodes():
    devices = await MockPlugin({"devices": 4}).discover()
    assert [d.id for d in devices] == ["0", "1", "2", "3"]
    assert [d.numa_node for d in devices] == [0, 1, 0, 1]
    assert all(d.memory == 16 * GiB and d.mock for d in devices)
    assert all(d.model == "CUDA GPU (mock)" for d in devices)
    assert devices[0].uuid == "GPU-mock-host-0"  # no agent id configured


async def test_a_real_sounding_model_gets_the_mock_label():
    (device,) = await MockPlugin({"devices": [{"model": "NVIDIA A100"}]}).discover()
    assert device.model == "NVIDIA A100 (mock)"


async def test_two_mock_agents_have_distinct_uuids():
    a = await MockPlugin({"devices": 2, "agent_id": "a"}).discover()
    b = await MockPlugin({"devices": 2, "agent_id": "b"}).discover()
    assert not {d.uuid for d in a} & {d.uuid for d in b}


def test_duplicate_mock_ids_are_refused():
    with pytest.raises(ValueError, match="twice"):
        MockPlugin({"devices": [{"id": "0"}, {"id": "0"}]})


async def test_slots_count_devices_and_offer_shares_only_with_sharing():
    plain = MockPlugin({"devices": 3})
    assert plain.slots(await plain.discover()) == ResourceSlot({"cuda.device": Decimal(3)})
    assert not plain.sharing_supported and "whole" in plain.sharing_note

    sharing = MockPlugin({"devices": 3, "sharing": True})
    devices = await sharing.discover()
    assert [d.shares for d in devices] == ["1"] * 3
    assert sharing.slots(devices) == ResourceSlot({"cuda.device": Decimal(3), "cuda.shares": Decimal(3)})
    assert "simulated" in sharing.sharing_note


async def test_mock_stats_are_simulated_zeros_with_total_memory():
    stats = await MockPlugin(TWO_DECLARED).stats()
    assert [(s.id, s.memory_total, s.memory_used, s.utilization_pct) for s in stats] == [
        ("0", 40 * GiB, 0, 0.0),
        ("1", 40 * GiB, 0, 0.0),
    ]


# -- mock device grants ----------------------------------------------------------------------


async def test_mock_whole_devices_get_the_cuda_environment_and_no_devices():
    plugin = MockPlugin(TWO_DECLARED)
    devices = await plugin.discover()
    grant = plugin.grant({"1": Decimal(1), "0": Decimal(1)}, devices)
    assert grant.env == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-mock-agent-a-0,GPU-mock-agent-a-1",
        "BACKENDAI_ACCELERATOR_DEVICES": "0,1",
        "BACKENDAI_ACCELERATOR_MOCK": "1",
    }
    assert grant.device_ids == [] and grant.mounts == []


async def test_mock_fraction_sets_mps_limits():
    plugin = MockPlugin({**TWO_DECLARED, "sharing": True})
    devices = await plugin.discover()
    grant = plugin.grant({"1": Decimal("0.25")}, devices)
    assert grant.env["NVIDIA_VISIBLE_DEVICES"] == "GPU-mock-agent-a-1"
    assert grant.env["BACKENDAI_ACCELERATOR_DEVICES"] == "1"
    assert grant.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert grant.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={10 * GiB // MiB}M"
    assert grant.device_ids == [] and grant.mounts == []


async def test_mock_refuses_unknown_ids_and_fractions_without_sharing():
    plugin = MockPlugin(TWO_DECLARED)
    devices = await plugin.discover()
    with pytest.raises(ValueError, match="unknown device id.*7"):
        plugin.grant({"7": Decimal(1)}, devices)
    with pytest.raises(ValueError, match="whole devices"):
        plugin.grant({"0": Decimal("0.5")}, devices)


# -- finding plugins ---------------------------------------------------------------------------


async def test_load_plugins_by_entry_point_name():
    (plugin,) = load_plugins(["mock"], {"mock": {"devices": 2, "agent_id": "x"}})
    assert isinstance(plugin, MockPlugin) and plugin.key == "cuda"
    assert [d.uuid for d in await plugin.discover()] == ["GPU-mock-x-0", "GPU-mock-x-1"]


def test_unknown_plugin_names_the_installed_ones():
    with pytest.raises(ValueError) as e:
        load_plugins(["nope"], {})
    message = str(e.value)
    assert "nope" in message and "mock" in message and "cuda" in message


# -- the NVIDIA plugin -------------------------------------------------------------------------


async def test_nvidia_discovery_never_raises(caplog: pytest.LogCaptureFixture):
    plugin = NvidiaPlugin({})
    with caplog.at_level(logging.INFO, logger="backendai_jupyter.agent.accelerators.nvidia"):
        devices = await plugin.discover()
    stats = await plugin.stats()
    if devices:  # a host with NVIDIA GPUs: they must be described fully
        assert all(d.plugin == "cuda" and d.uuid and d.memory > 0 and not d.mock for d in devices)
        assert [s.id for s in stats] == [d.id for d in devices]
    else:  # no GPU, no driver or no libnvidia-ml: nothing offered, and the log says why
        assert stats == []
        assert any("no NVIDIA GPUs offered" in r.getMessage() for r in caplog.records)
        assert plugin.slots(devices) == ResourceSlot()


async def test_nvidia_sharing_follows_the_mps_control_pipe(tmp_path):
    plugin = NvidiaPlugin({"mps_pipe_dir": str(tmp_path)})
    await plugin.discover()
    assert not plugin.sharing_supported
    assert "MPS" in plugin.sharing_note and "whole" in plugin.sharing_note

    os.mkfifo(tmp_path / "control")
    await plugin.discover()
    assert plugin.sharing_supported


def test_nvidia_whole_devices_are_granted_to_the_nvidia_driver_by_exactly_their_uuids():
    plugin = NvidiaPlugin({})
    grant = plugin.grant({"2": Decimal(1), "0": Decimal(1)}, gpus("0", "1", "2"))
    assert isinstance(grant, DeviceGrant) and grant.plugin == "cuda"
    assert grant.driver == "nvidia"
    assert grant.device_ids == ["GPU-0-uuid", "GPU-2-uuid"]
    assert grant.capabilities == ["gpu"] and grant.device_nodes == []
    assert grant.env == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-0-uuid,GPU-2-uuid",
        "BACKENDAI_ACCELERATOR_DEVICES": "0,2",
    }
    assert grant.mounts == []


def test_nvidia_ids_sort_numerically():
    grant = NvidiaPlugin({}).grant({"10": Decimal(1), "2": Decimal(1)}, gpus("2", "10"))
    assert grant.env["BACKENDAI_ACCELERATOR_DEVICES"] == "2,10"
    assert grant.device_ids == ["GPU-2-uuid", "GPU-10-uuid"]


def test_nvidia_fraction_uses_mps_with_the_pipe_directory_mounted(tmp_path):
    plugin = NvidiaPlugin({"mps_pipe_dir": str(tmp_path)})
    plugin.sharing_supported = True
    grant = plugin.grant({"1": Decimal("0.5")}, gpus("0", "1", shares="1"))
    assert grant.device_ids == ["GPU-1-uuid"]
    assert grant.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert grant.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={40 * GiB // MiB}M"
    assert grant.env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path)
    assert grant.mounts == [Mount(str(tmp_path), str(tmp_path), read_only=False)]


def test_nvidia_and_mock_give_kernels_the_same_environment():
    allocation = {"0": Decimal("0.3")}
    real = NvidiaPlugin({"mps_pipe_dir": "/run/mps"})
    real.sharing_supported = True
    fake = MockPlugin({"devices": 1, "sharing": True})
    real_env = real.grant(allocation, gpus("0", shares="1")).env
    fake_env = fake.grant(allocation, gpus("0", shares="1")).env
    assert {k: v for k, v in real_env.items() if k != "CUDA_MPS_PIPE_DIRECTORY"} == {
        k: v for k, v in fake_env.items() if k != "BACKENDAI_ACCELERATOR_MOCK"
    }


def test_nvidia_refuses_unknown_ids_and_unsupported_fractions():
    plugin = NvidiaPlugin({})
    with pytest.raises(ValueError, match="unknown device id"):
        plugin.grant({"9": Decimal(1)}, gpus("0"))
    with pytest.raises(ValueError, match="whole devices"):
        plugin.grant({"0": Decimal("0.5")}, gpus("0"))
    plugin.sharing_supported = True
    with pytest.raises(ValueError, match="only device"):
        plugin.grant({"0": Decimal("0.5"), "1": Decimal(1)}, gpus("0", "1", shares="1"))


def test_mig_instances_are_allocated_by_their_own_uuid():
    mig_uuid = "MIG-4a1b2c3d-0000-1111-2222-333344445555"
    mig = Device(plugin="cuda", id=mig_uuid, uuid=mig_uuid, model="NVIDIA A100 MIG 1g.5gb", memory=5 * GiB)
    grant = NvidiaPlugin({}).grant({mig_uuid: Decimal(1)}, [mig])
    assert grant.device_ids == [mig_uuid]
    assert grant.env["BACKENDAI_ACCELERATOR_DEVICES"] == mig_uuid


def test_nvml_bus_ids_map_to_sysfs_names():
    assert sysfs_pci_name("00000000:3B:00.0") == "0000:3b:00.0"
    assert sysfs_pci_name("0001:81:00.0") == "0001:81:00.0"
