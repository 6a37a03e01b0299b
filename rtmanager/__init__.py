"""Galaxy Runtime Manager."""
