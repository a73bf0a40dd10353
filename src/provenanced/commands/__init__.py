"""Commands beside the audit: install, demo, configuration reference."""
