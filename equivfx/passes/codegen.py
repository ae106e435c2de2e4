"""Generated code that reaches submodules through ``_modules``, not ``nn.Module.__getattr__``.

torch.fx writes a call of the module at ``layers.0.conv1`` as
``getattr(self.layers, "0").conv1(x)``: three attribute reads, each of which misses the
instance dictionary and runs ``nn.Module.__getattr__``, a Python function. On the benchmark
machine that chain costs about 2-3 us per call, and a ResNet-style graph makes 22 such calls per
forward (the model's own code pays one such read per call, ``self.conv1``). :class:`DirectModules`
writes ``self._modules['layers']._modules['0']._modules['conv1'](x)`` instead: the same
dictionaries ``__getattr__`` reads, without calling it (0.16 us). Module calls are unchanged:
hooks run, and a submodule replaced later (``setattr``, ``add_module``) is the one called.

A path is written this way only where, at code generation, each step reads the submodule that
``getattr`` reads (a class that defines the name itself, as a property or attribute, keeps the
``getattr`` form). ``get_attr`` nodes read their last step (a parameter, buffer or constant) with
``getattr``, so parametrizations added later still apply; a ``get_attr`` of a submodule itself
reads it from ``_modules`` too. The code generator is kept by
``copy.deepcopy`` and, through :func:`keep_state_through_copies`, by ``torch.save``/``torch.load``
(which also keeps what fx's own unpickling drops: see that function).

One difference from fx's code: calling a submodule deleted after compilation raises ``KeyError``
(the missing key) where fx's chain raised ``AttributeError``.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch.fx as fx
from torch import nn
from torch.fx.graph import CodeGen

__all__ = [
    "DirectModules",
    "copy_keeping_state",
    "deepcopy_keeping_state",
    "direct_module_access",
    "keep_state_through_copies",
]

log = logging.getLogger(__name__)


def fx_target(base: str, target: str) -> str:
    """The expression fx writes for ``target`` on ``base`` (torch.fx.graph._format_target)."""
    for step in target.split("."):
        base = f"{base}.{step}" if step.isidentifier() else f'getattr({base}, "{step}")'
    return base


def _submodules(root: nn.Module, steps: list[str]) -> bool:
    """Whether each of ``steps`` from ``root`` reads a submodule that ``getattr`` would read:
    one in ``_modules`` that neither the instance nor its class defines otherwise, on a class that
    does not override attribute lookup."""
    module = root
    for step in steps:
        child = module._modules.get(step)
        klass = type(module)
        if (
            child is None
            or step in module.__dict__
            or any(step in vars(k) for k in klass.__mro__)
            or klass.__getattr__ is not nn.Module.__getattr__
            or klass.__getattribute__ is not object.__getattribute__
        ):
            return False
        module = child
    return True


class DirectModules(CodeGen):
    """fx's code generator, with module paths read from ``_modules`` (see the module
    docstring)."""

    def _gen_python_code(self, nodes, root_module, *args, **kwargs):
        code = super()._gen_python_code(nodes, root_module, *args, **kwargs)
        owner = getattr(getattr(nodes, "graph", None), "owning_module", None)
        if owner is None:  # a graph no single module owns: fx's code as it is
            return code
        reads = {n.name: n for n in nodes if n.op in ("call_module", "get_attr")}
        if not reads:
            return code
        # fx writes each node on a line of its own, starting with the node's name: one pass over
        # the lines (a replace over the whole source per node would be quadratic in graph size)
        lines = code.src.split("\n")
        for i, line in enumerate(lines):
            stripped = line.lstrip()
            node = reads.get(stripped.split(" ", 1)[0].split(":", 1)[0])
            if node is not None:
                lines[i] = _rewritten(line, node, owner, root_module)
        code.src = "\n".join(lines)
        return code


def _rewritten(line: str, node: fx.Node, owner: nn.Module, root: str) -> str:
    """``line`` (node's assignment) reading node's target through ``_modules`` where it may."""
    path = node.target.split(".")
    calls = node.op == "call_module"
    whole = not calls and _submodules(owner, path)  # a get_attr of a submodule itself
    modules = path if calls or whole else path[:-1]  # else the module owning the attribute
    if not modules or not _submodules(owner, modules):
        return line
    old = " = " + fx_target(root, node.target)
    expr = root + "".join(f"._modules[{step!r}]" for step in modules)
    if calls:
        return line.replace(old + "(", f" = {expr}(", 1)
    last = path[-1]
    if whole:
        new = f" = {expr}"
    else:
        new = f" = {expr}.{last}" if last.isidentifier() else f" = getattr({expr}, {last!r})"
    if old + ";" in line:  # fx appends ";  x = None" where a value dies here
        return line.replace(old + ";", new + ";", 1)
    return line[: -len(old)] + new if line.endswith(old) else line


def direct_module_access(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``gm``'s graph the :class:`DirectModules` generator and regenerate its code (a graph
    with another generator, such as fx's pytree one, keeps it)."""
    if with_direct_module_access(gm.graph):
        gm.recompile()
    return gm


def with_direct_module_access(graph: fx.Graph) -> bool:
    """Give ``graph`` the :class:`DirectModules` generator where it has fx's plain one (for
    its graph module's next code generation, which this does not run); whether it changed."""
    codegen = getattr(graph, "_codegen", None)
    if type(codegen) is CodeGen:
        graph.set_codegen(DirectModules())
        return True
    if not isinstance(codegen, DirectModules):
        log.debug("equivfx: a graph keeps its code generator %s", type(codegen))
    return False


# ---------------------------------------------------------------------------------- pickling
# fx pickles a graph module as its code and, on loading, traces that code again into a new module
# that keeps only what the graph reads and whatever attribute the new module lacks: submodules
# and tensors the graph does not read (kept for the state dict), ``training``, ``meta`` (with
# ``equivfx_info`` for deep copies) and hooks are lost, and the code is fx's own again.
_REGENERATED = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start"})


def keep_state_through_copies(gm: fx.GraphModule) -> None:
    """Make ``gm`` (a graph module equivfx built) load from a pickle with every attribute it had,
    and this module's code generator; and keep its root-level non-persistent buffers
    non-persistent in deep copies (fx's deep copy registers the buffers it copies anew, as
    persistent). fx gives every graph module a class of its own, so the reductions set here are
    ``gm``'s only; its copies' classes are given them as they are made."""
    _set_reductions(type(gm))
    if gm._non_persistent_buffers_set:
        names = frozenset(gm._non_persistent_buffers_set)
        gm._deepcopy_hooks.append(functools.partial(_mark_non_persistent, names))


_HOOKS = frozenset(
    {"_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
     "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
     "_backward_pre_hooks", "_is_full_backward_hook"}
)  # fmt: skip
"""The module hooks ``nn.Module.__init__`` sets afresh (fx's deep copy keeps only state-dict
hooks)."""


def deepcopy_keeping_state(self: fx.GraphModule, memo: dict) -> fx.GraphModule:
    """fx's deep copy, then what it drops put back: the module's forward and backward hooks, and
    every attribute set on it that its rebuilt copy lacks (copied with the same memo: objects
    fx copied already are not copied twice)."""
    copied = fx.GraphModule.__deepcopy__(self, memo)
    for key, value in self.__dict__.items():
        if key in _HOOKS or (key not in copied.__dict__ and key not in _REGENERATED):
            copied.__dict__[key] = copy.deepcopy(value, memo)
    _keep_reductions(type(self), type(copied))
    return copied


def copy_keeping_state(self: fx.GraphModule) -> fx.GraphModule:
    """A shallow copy as ``copy.copy`` makes of any ``nn.Module``: a new module object holding the
    same attributes (submodules, parameters, hooks, graph and code). fx's own rebuilds the module
    from its graph, keeping only what the graph reads: parameters it does not read (state-dict
    keys), hooks, attributes set on it and, for a chunked model, every state-dict key. The copy
    shares the module's class (whose ``forward`` is its generated code), as it shares its graph."""
    copied = object.__new__(type(self))  # GraphModule.__new__ would make a class, without code
    copied.__dict__.update(self.__dict__)
    return copied


def _set_reductions(cls: type) -> None:
    """Pickling, deep and shallow copies of ``cls``'s modules keep their state (see
    :func:`keep_state_through_copies`)."""
    cls.__reduce__ = _reduce_keeping_state
    cls.__deepcopy__ = deepcopy_keeping_state
    cls.__copy__ = copy_keeping_state


def _keep_reductions(source: type, target: type) -> None:
    """fx gives every copy a class of its own: give it the reductions ``source`` (the copied
    module's own class) was given, so copies of copies (and pickles of copies) keep state too.
    Methods a class inherits (``_Chunked``'s) are inherited by the copy's class as well."""
    for name in ("__reduce__", "__deepcopy__", "__copy__"):
        method = source.__dict__.get(name)
        if method is not None:
            setattr(target, name, method)


def _mark_non_persistent(names: frozenset, copied: fx.GraphModule) -> None:
    copied._non_persistent_buffers_set.update(n for n in names if n in copied._buffers)


def _reduce_keeping_state(self):
    rebuild, args = fx.GraphModule.__reduce__(self)
    return (_unpickle_keeping_state, (rebuild, args))


def _unpickle_keeping_state(rebuild, args) -> fx.GraphModule:
    gm = rebuild(*args)
    body = args[0]  # the pickled module's __dict__, less its graph
    gm.__dict__.update({k: v for k, v in body.items() if k not in _REGENERATED})
    direct_module_access(gm)
    # the new module's class reduces and deep-copies as the pickled one's did; its deep-copy
    # hooks came back with its __dict__ (keep_state_through_copies would add them a second time)
    _set_reductions(type(gm))
    return gm
