"""Which models exist and where they live: the registry (models.json), the loader that keeps
models resident under a memory budget, RAM tiers and size estimates, and the memory monitor.
"""
