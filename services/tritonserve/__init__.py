"""Triton for local runs and tests: a real tritonserver (bundled with PyTriton)
serving the embedded llama.cpp engine as one decoupled model under the tensor
names of Triton's vLLM backend (see ``llm_model.py``), so the worker's
``triton`` engine talks to it exactly as to a Triton + vLLM deployment."""
