"""drmi-ray: DRMI dataset reduction for query-efficient black-box attacks, on Ray."""

__version__ = "0.1.0"
