"""Synthetic demo world: real dataset formats with a planted, known ground truth."""

from metalign.demo.world import generate_world, register, validate_spec

__all__ = ["generate_world", "register", "validate_spec"]
