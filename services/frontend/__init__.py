"""Frontend: the public Inference gRPC API and the OpenAI-compatible HTTP API."""
