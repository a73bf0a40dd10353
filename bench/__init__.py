"""Benchmarks of provenanced against a sandboxed user manager (`python -m bench`, `make bench`)."""
