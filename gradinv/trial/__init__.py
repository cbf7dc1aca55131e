"""A trial: one client's update, attacked once.

- spec.py: its settings (:class:`TrialSpec`, the rules they keep, the key, which trials share lanes);
- run.py: running trials packed into lanes, and scoring each (:func:`run_trials`).
"""

from .run import TrialOutcome, cached_victim, run_trials
from .spec import DEFAULTS, TrialRules, TrialSpec, lane_signature, spec_class

__all__ = [
    "DEFAULTS",
    "TrialOutcome",
    "TrialRules",
    "TrialSpec",
    "cached_victim",
    "lane_signature",
    "run_trials",
    "spec_class",
]
