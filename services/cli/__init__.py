"""The `llmfabric` command: up, status, chat."""
