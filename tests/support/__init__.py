"""Test helpers that are not fixtures of one suite (private servers for fault tests)."""
