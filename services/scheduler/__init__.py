"""Scheduler service: queueing, admission and routing to workers."""
