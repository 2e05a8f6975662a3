"""Click commands of the `mvtcae` CLI, one module per command; each is a thin wrapper."""
