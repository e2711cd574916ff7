"""The EventType enum mirrors the ``event`` options declared in the .proto files."""

from __future__ import annotations

import importlib
import pkgutil

from google.protobuf.descriptor import Descriptor

import flywheel.contracts
from flywheel.contracts.events.v1 import envelope_pb2
from flywheel.core.events.topics import EventType, Topic


def _declared_events() -> dict[str, str]:
    declared: dict[str, str] = {}
    for module_info in pkgutil.walk_packages(flywheel.contracts.__path__, "flywheel.contracts."):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(module_info.name)
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            assert isinstance(descriptor, Descriptor)
            options = descriptor.GetOptions()
            if options.HasExtension(envelope_pb2.event):
                option = options.Extensions[envelope_pb2.event]
                declared[option.type] = option.topic
    return declared


def test_enum_and_proto_declare_the_same_events() -> None:
    declared = _declared_events()
    assert set(declared) == {str(t) for t in EventType}
    assert set(declared.values()) == {str(t) for t in Topic}
