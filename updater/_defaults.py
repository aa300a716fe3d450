"""Defaults of the updater settings that ``agent.toml`` exposes: plain constants, shared by
the dataclasses (``_config.py``) and the agent's config schema, which validates a file
without building the dataclasses (``agent boot-check`` needs none of them, issue 15)."""

from __future__ import annotations

HTTPS_MIN_SPEED = 1024  # bytes per second, averaged over HTTPS_MIN_SPEED_WINDOW
HTTPS_MIN_SPEED_WINDOW = 60.0  # seconds
HTTPS_HEADER_TIMEOUT = 30.0  # seconds from a request to the end of its headers
HTTPS_METADATA_TIMEOUT = 120.0  # seconds for one metadata file in all

MQTT_CONNECT_TIMEOUT = 10.0  # seconds
MQTT_BLOCK_TIMEOUT = 5.0  # seconds for one block's answer
MQTT_MAX_RETRIES = 4  # requests of one block

HEALTH_TIMEOUT = 120.0  # seconds (wall clock) the health check's child may run
HEALTH_NICE = 10  # niceness added to the child
HEALTH_UNSAFE_NO_SANDBOX = False

# The most seconds an announcement's refresh waits, a random share of it per device: a
# retained announcement reaching 10,000 devices at once starts ~33 refreshes a second
# over 5 minutes, not 10,000 in the same second. 0 for a lab or a single device.
ANNOUNCE_SPREAD = 300.0
