"""Helpers shared by more than one test suite (one place: tests/support/)."""
