"""saebatch's shared library: manifests, run directories, models, SAEs, hooks, shards, launching.

Nothing in here knows a particular experiment; job modules in `jobs/` build on it.
"""
