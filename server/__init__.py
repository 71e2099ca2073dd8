"""Tessera's server: the composition root and every adapter with I/O (store, cache, bus, CLI)."""
