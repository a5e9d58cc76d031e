r"""Shared utilities: errors, configuration, metrics, checkpoints, run folders, seeding and devices."""
