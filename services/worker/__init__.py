"""Inference worker: one gRPC service over several engines."""
