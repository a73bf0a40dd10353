"""Adapters that read and watch the file system."""
