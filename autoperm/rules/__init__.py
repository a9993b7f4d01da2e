"""Per-op rules. Each declares how one op couples its tensors' axes; ops without a rule pin what they touch."""
from ._registry import get_rule, is_registered, list_rules, register_rule
from . import attention, conv, creation, elementwise, indexing, linear, norm, recurrent, reduce, shape  # noqa: F401  (registration)
from . import moe  # noqa: F401,E402  (after shape: wraps its sort and cumsum rules)

__all__ = ["register_rule", "get_rule", "list_rules", "is_registered"]
