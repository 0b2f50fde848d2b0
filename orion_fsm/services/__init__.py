"""Engine-wide services the request phases call, one subpackage per concern.

Imports flow one way: phases -> services -> backends; a service never imports a phase.
"""
