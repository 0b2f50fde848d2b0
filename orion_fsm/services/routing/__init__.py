"""Choosing the agent for a request: the rule router, the embedding service (one MiniLM per
process, micro-batched) and the embedding router built on it.
"""
