"""Test setup. Eight fake CPU devices for the sharding tests: the flag must be
set before JAX initialises its backend, so it is set here, at collection."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub
