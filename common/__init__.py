"""saebatch's shared library: manifests, run directories, models, SAEs, hooks, shards, launching.

Nothing in here knows a particular experiment; job modules in `jobs/` build on it. The built-in
model organisms are loaded here (common.organism), so any job can run on them; how they are made,
and the slot-machine task they learned, are the experiment side's (jobs._organism, jobs._slot_machine).
Code here calls into `jobs/` only to dispatch: the registry to the jobs, the CLI's `organism`
commands and the `builtin: organism` corpus to jobs._organism.
"""
