"""Where findings go: Prometheus metrics, HTTP, journald."""
