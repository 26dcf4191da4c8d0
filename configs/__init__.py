"""Experiment configs: one get_config() per file; variants import a base and override it."""
