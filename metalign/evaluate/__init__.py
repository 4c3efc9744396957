"""Evaluations of representations against human data (protocols.md §9)."""
