"""The gateway's orders to agents: typed on both sides, one method name each, round-tripped."""

from __future__ import annotations

import dataclasses

import pytest

from backendai_jupyter.common.slots import ResourceSlot
from backendai_jupyter.common.wire import (
    KERNEL_HOME,
    ORDERS,
    CreateKernel,
    DestroyKernel,
    Mount,
    RestartKernel,
    SignalKernel,
    UnknownOrder,
    order_from_call,
)

CREATE = CreateKernel(
    "s1",
    "backendai-jupyter/python:latest",
    ResourceSlot.parse({"cpu": "1", "mem": "1g"}),
    {"KERNEL_X": "1"},
    "u1",
    devices={"cuda": {"0": "1"}},
    mounts=[Mount("local", "/volumes/local", "u1/vf1", f"{KERNEL_HOME}/work", "rw", "vf1", "work")],
    working_dir=f"{KERNEL_HOME}/work",
)


@pytest.mark.parametrize(
    "order",
    [
        CREATE,
        RestartKernel(**{f.name: getattr(CREATE, f.name) for f in dataclasses.fields(CREATE)}),
        DestroyKernel("s1"),
        SignalKernel("s1", "SIGINT"),
    ],
)
def test_every_order_round_trips_through_its_call(order):
    again = order_from_call(order.METHOD, order.to_json())
    assert type(again) is type(order)
    assert again == order


def test_each_order_has_its_own_method():
    assert sorted(ORDERS) == ["create_kernel", "destroy_kernel", "restart_kernel", "signal_kernel"]
    assert RestartKernel.METHOD != CreateKernel.METHOD


@pytest.mark.parametrize("method", ["launch_missiles", None, 7])
def test_an_unknown_method_is_refused_by_name(method):
    with pytest.raises(UnknownOrder, match="unknown order"):
        order_from_call(method, {"session_id": "s1"})


def test_an_order_without_its_parameters_is_refused():
    with pytest.raises(KeyError):
        order_from_call("signal_kernel", {"session_id": "s1"})
