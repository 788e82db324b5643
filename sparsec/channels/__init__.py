"""Structured pruning: channel coupling analysis, selection, compensation and the rewrite."""
