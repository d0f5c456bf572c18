"""Experiment jobs: one module per experiment, each following common.registry.Job."""
