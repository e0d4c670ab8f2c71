"""Backbone-specific fast paths, each behind its backbone's own forward or methods: the same function as the
textbook layers, computed another way (docs/performance.md says how each was measured)."""
