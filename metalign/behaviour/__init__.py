"""Evaluations of representations against human data (docs/methods.md §9)."""
