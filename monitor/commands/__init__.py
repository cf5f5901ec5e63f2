"""Commands beside the daemon: `hms-mgmt status` and the configuration reference."""
