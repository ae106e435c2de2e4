"""The equivfx exception hierarchy.

Every error equivfx raises on bad input is a subclass of :class:`EquivFXError`. Each subclass also
inherits the builtin exception that matches it (``ValueError``, ``TypeError`` ...), so code that
already
catches the builtin keeps working.

Messages follow one shape: what failed, the offending value, what was expected, and how to fix it.
:func:`explain` builds that shape so every module words its errors the same way.
"""

from __future__ import annotations

__all__ = [
    "EquivFXError",
    "GroupSpecError",
    "GroupLawError",
    "ActionLawError",
    "InputShapeError",
    "ModelTypeError",
    "TraceError",
    "MissingRuleError",
    "BatchMixingError",
    "ReadoutError",
    "NotYetSupportedError",
    "PipelineError",
    "EquivarianceError",
    "FixedArgumentError",
    "VerifyArgumentError",
    "explain",
]


def explain(
    what: str, got: object = None, expected: str | None = None, fix: str | None = None
) -> str:
    """Format an error message as: what failed; got ...; expected ...; how to fix it.

    Example:
        >>> explain("unknown group spec", "Q8", "one of C4, D4", "use equivfx.group('D4')")
        "unknown group spec: got 'Q8'; expected one of C4, D4. Fix: use equivfx.group('D4')"
    """
    parts = [what]
    if got is not None:
        parts[0] += f": got {got!r}"
    if expected:
        parts.append(f"expected {expected}")
    msg = "; ".join(parts)
    if fix:
        msg += f". Fix: {fix}"
    return msg


class EquivFXError(Exception):
    """Root of every error equivfx raises on purpose."""


class GroupSpecError(EquivFXError, ValueError):
    """A group spec string (or factory argument) is malformed or unknown."""


class GroupLawError(EquivFXError, ValueError):
    """A user-given group is not a group: not closed, not associative, no identity or inverses."""


class ActionLawError(EquivFXError, ValueError):
    """An action breaks e.x = x or (gh).x = g.(h.x) on the generators, or factors that must commute
    do not."""


class InputShapeError(EquivFXError, ValueError):
    """An input tensor does not fit the group's action (e.g. a non-square image under C4)."""


class ModelTypeError(EquivFXError, TypeError):
    """Something that is not a torch.nn.Module was given where a model was expected."""


class TraceError(EquivFXError, RuntimeError):
    """The front end could not capture the model at all, not even as one opaque node."""


class FixedArgumentError(EquivFXError, ValueError):
    """A compiled model was called with another value for a non-tensor argument (``mask=None``,
    ``flag=False``) that its graph was traced with: the model's code branches on it, which
    tracing resolves once."""


class MissingRuleError(EquivFXError, NotImplementedError):
    """An op appears where a pass needs per-op knowledge, and the rule table has none for it."""


class BatchMixingError(EquivFXError, ValueError):
    """An op mixes samples of the batch axis, or bakes the batch size in, so slots cannot be
    folded."""


class ReadoutError(EquivFXError, ValueError):
    """A readout option is unknown or misses what it needs (e.g. ``equivariant`` without an output
    action)."""


class NotYetSupportedError(EquivFXError, NotImplementedError):
    """A documented option whose implementation has not landed yet."""


class PipelineError(EquivFXError, ValueError):
    """A pass pipeline is ill-formed: a pass requires metadata no earlier pass provides."""


class VerifyArgumentError(EquivFXError, ValueError):
    """An argument of :func:`equivfx.verify` is out of range (a negative or non-finite
    tolerance)."""


class EquivarianceError(EquivFXError, AssertionError):
    """Raised by :func:`equivfx.testing.assert_equivariant` when a model is not equivariant."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function name the first
    frame outside equivfx, torch and fx's generated code: the user's line, however deep the
    call chain (a compiled model's first call goes through nn.Module and generated forwards)."""
    import os
    import sys

    import torch

    inside = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(inside) or frame.f_code.co_filename.startswith("<eval")
    ):
        frame, level = frame.f_back, level + 1
    return level
