"""Shared fixtures live in plugin modules, one per real component they start."""

pytest_plugins = ["tests.fixtures_store", "tests.fixtures_kafka", "tests.fixtures_model"]
