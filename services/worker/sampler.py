"""Per-sequence llama.cpp sampler chains built from Sampling."""

from __future__ import annotations

import random

import llama_cpp

from llmfabric.structs import Sampling

_PENALTY_LAST_N = 64


def build_sampler(s: Sampling):
    """A sampler chain handle; free it with ``free_sampler``.

    temperature 0 → greedy; otherwise penalties → top-k → top-p → temperature
    → seeded draw (a random seed when the request sets none).
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if s.repetition_penalty != 1.0:
        add(chain, llama_cpp.llama_sampler_init_penalties(_PENALTY_LAST_N, s.repetition_penalty, 0.0, 0.0))
    if s.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
    seed = s.seed if s.seed is not None else random.getrandbits(32)
    add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def free_sampler(chain) -> None:
    if chain:
        llama_cpp.llama_sampler_free(chain)
