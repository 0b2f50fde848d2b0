"""Which models exist and where they live: the registry (models.json), the loader that keeps
models resident under a memory budget, RAM tiers and size estimates, memory pressure levels
and the memory monitor that grades them (the loader and the monitor meet only in _pressure).
"""
