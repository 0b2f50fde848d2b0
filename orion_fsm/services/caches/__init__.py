"""The three cache levels (L1 results, L2 embeddings, L3 intermediate results): a hybrid
LFU+LRU memory tier in front of a diskcache tier that survives restarts and crashes.
"""
