"""provenanced: where every systemd user unit's definition comes from, and when it drifts."""

__version__ = "0.1.0"
