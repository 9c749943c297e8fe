"""prefopt: Direct Preference Optimization and its reward-free family."""

__version__ = "0.1.0"
