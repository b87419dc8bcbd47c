"""Shared runtime for every llmfabric service: server bootstrap, health,
reflection, graceful drain, error mapping, request ids, JSON logs, metrics
and configuration. Services compose these pieces; none is copied."""
