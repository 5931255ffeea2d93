"""premoe: training-free expert pruning and retrieval for Mixture-of-Experts LLMs."""
__version__ = "0.1.0"
