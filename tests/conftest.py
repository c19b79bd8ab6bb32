"""Shared test set-up: CPU only, deterministic, small."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
