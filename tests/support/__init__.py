"""Helpers the test modules share (tests/ is on sys.path: tests/conftest.py). Fixtures live in conftest.py."""
