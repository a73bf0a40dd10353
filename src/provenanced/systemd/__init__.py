"""Adapters that talk to the user manager over D-Bus."""
