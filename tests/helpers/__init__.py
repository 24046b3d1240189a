"""Helpers the tests share (imported as `helpers.<module>`; nothing imports conftest by name)."""
