"""Benchmarks of orion_fsm (`make bench`): figures we measure, never figures we assume."""
