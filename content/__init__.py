"""Tessera's content engine: the rule language, segments, bucketing, snapshots and decisions.

Pure and synchronous: no I/O, no clock (``now`` is always an argument), nothing from ``schema`` or
``server``.
"""
