"""The bind-address rule shared by the API server and the chat page, kept apart from the model code so that a
refused `--host` answers before torch is imported."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
