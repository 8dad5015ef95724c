"""A ShipEngine simulator: the tracking API, signed `track` webhooks and scripted failures.

Tests run it in-process (`create_simulator_app`, then `app[SIMULATOR]` for the Python API);
demos run it with `python -m service.simulator`.
"""

from service.simulator.app import create_simulator_app
from service.simulator.appkeys import SIMULATOR
from service.simulator.config import SimulatorConfig
from service.simulator.records import (
    CANCELLED_STATUS,
    CallRecord,
    DeliveryRecord,
    LifecycleOptions,
    Script,
    Webhook,
)
from service.simulator.signing import SigningKeys
from service.simulator.simulator import Package, Simulator

__all__ = [
    "CANCELLED_STATUS",
    "SIMULATOR",
    "CallRecord",
    "DeliveryRecord",
    "LifecycleOptions",
    "Package",
    "Script",
    "SigningKeys",
    "Simulator",
    "SimulatorConfig",
    "Webhook",
    "create_simulator_app",
]
