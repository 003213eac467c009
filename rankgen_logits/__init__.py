"""RankGen ("Improving Text Generation with Large Ranking Models") as a generation strategy for transformers.

Work in progress: the scorer and ``generate(..., rankgen=scorer)`` are not implemented yet.
"""

__version__ = "0.1.0"
