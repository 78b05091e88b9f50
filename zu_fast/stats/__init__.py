"""Corpus statistics: collection (one pass, all layers), moments, on-disk cache."""

from .collect import CorpusStats, collect_stats, describe
from .moments import LayerStats
from .store import cache_root, load_stats, save_stats

__all__ = ["CorpusStats", "LayerStats", "cache_root", "collect_stats", "describe", "load_stats", "save_stats"]
