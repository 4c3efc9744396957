"""metalign: what meta-learning does to visual representations."""

__version__ = "0.1.0"
