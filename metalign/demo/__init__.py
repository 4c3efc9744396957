"""Synthetic demo world: real dataset formats with a planted, known ground truth."""
