"""Experiment configs: one file per dataset over a shared base."""
