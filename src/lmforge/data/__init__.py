"""Data: corpus sources, prepared token shards, loaders and collators.

Import the submodules directly (``lmforge.data.sources``, ``lmforge.data.prepare``,
``lmforge.data.shards``, ``lmforge.data.loaders``, ...); this package re-exports nothing
so that each module stays independent of the others.
"""
