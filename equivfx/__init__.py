"""equivfx: make any PyTorch model equivariant or invariant to a finite group, by compiling it.

Example:
    >>> import torch, equivfx
    >>> G = equivfx.group("C4")
    >>> G.order
    4
"""

from equivfx import errors
from equivfx.compiler import CompileInfo, compile
from equivfx.groups import FiniteGroup, group
from equivfx.pose import decode_pose
from equivfx.verify import Report, verify

__version__ = "0.1.0"

__all__ = [
    "CompileInfo",
    "FiniteGroup",
    "__version__",
    "compile",
    "decode_pose",
    "errors",
    "group",
    "Report",
    "verify",
]
