"""Alignment in front of other merging tools.

- :mod:`autoperm.plugins.fusion_bench`: ``AutopermAlignment``, a fusion_bench algorithm whose
  ``run(modelpool)`` aligns every model of the pool to the first and hands the aligned pool on
  (optionally straight to a merging algorithm such as ``SimpleAverageAlgorithm``);
- :mod:`autoperm.plugins.mergekit`: a pre-pass that reads a mergekit YAML config, writes aligned
  copies of the models it names, and writes a config pointing at them;
- :func:`align_states`: the step both share, for any other tool or script.

Neither fusion_bench nor mergekit is a dependency of autoperm: each module imports its package
when it is imported itself. See docs/plugins.md.
"""
from ._align import METHODS, align_states

__all__ = ["align_states", "METHODS"]
