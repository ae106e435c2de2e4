"""Generated code reaching submodules through ``_modules``: the same outputs as fx's own code,
hooks and replaced submodules honoured, fx's form kept where a class defines the name itself."""

from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph import CodeGen
from torch.nn.utils import parametrize

import equivfx
from equivfx.passes.codegen import DirectModules, direct_module_access, fx_target

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import ZOO  # noqa: E402


def _compile(model, spec, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return equivfx.compile(model, spec, example_inputs=x, **kwargs)


def _built(gm):
    """The graph modules equivfx built for ``gm``: it, and for chunked models flat's three parts."""
    chunks = gm._modules.get("equivfx_chunks")
    extra = () if chunks is None else (chunks.flat, *chunks.graphs.values())
    return [gm, *extra]


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((-2, -1)))


def test_fx_target_is_fx_format():
    """The expression this module replaces is the one fx writes (else nothing is replaced)."""
    gm = fx.symbolic_trace(Nested())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert fx_target("self", node.target) + "(" in fx.GraphModule(gm, gm.graph).code


@pytest.mark.parametrize("name", ["resnet", "vit", "seqconv", "mobilenet", "segnet"])
@pytest.mark.parametrize("chunk", [None, 2, "auto"])
def test_compiled_code_reads_modules_and_matches_fx_code(name, chunk):
    """Every graph module equivfx builds calls its submodules through ``_modules``, and gives
    bitwise what fx's interpreter gives on the same graph (node targets resolved with getattr)."""
    model, x, _ = ZOO[name]()
    model.eval()
    spec = ZOO[name].groups[0]
    kwargs = {"readout": "slots"}
    if "dense_output" in ZOO[name].tags:
        kwargs = {"readout": "equivariant", "output_action": spec}
    gm = _compile(model, spec, x, chunk=chunk, **kwargs)
    for built in _built(gm):
        assert isinstance(built.graph._codegen, DirectModules)
        assert "getattr(self" not in built.code
        calls = [n for n in built.graph.nodes if n.op == "call_module"]
        assert all(f"self._modules[{n.target.split('.')[0]!r}]" in built.code for n in calls)
    with torch.no_grad():
        flat = gm.equivfx_flat if hasattr(gm, "equivfx_flat") else gm
        expected = fx.Interpreter(flat).run(x)
        torch.testing.assert_close(flat(x), expected, rtol=0, atol=0)
        if chunk is None:
            torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_hooks_run_and_replaced_submodules_are_called():
    """Module calls stay module calls: a forward hook runs, and a submodule replaced after
    compilation (by setattr or add_module) is the one the compiled model calls."""
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = _compile(model, "C4", x, chunk=None)
    seen = []
    conv = getattr(gm.stem, "0")
    handle = conv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        gm(x)
    assert seen == [torch.Size([8, 4, 8, 8])]  # |G| B rows
    handle.remove()

    zero = nn.Linear(4, 5)
    nn.init.zeros_(zero.weight)
    nn.init.constant_(zero.bias, 3.0)
    gm.head = zero
    with torch.no_grad():
        torch.testing.assert_close(gm(x), torch.full((2, 5), 3.0))
    gm.head = head = nn.Linear(4, 5)  # back to a layer that reads its input
    with torch.no_grad():
        before = gm(x)
        getattr(gm.body, "0").add_module("1", nn.Tanh())  # add_module writes _modules directly
        after = gm(x)
        # fx's interpreter resolves every target with getattr at each run: the new Tanh
        torch.testing.assert_close(after, fx.Interpreter(gm).run(x), rtol=0, atol=0)
    assert not torch.allclose(before, after)
    assert gm.head is head


class _Shadowing(nn.Module):
    """A class whose property ``block`` shadows the submodule of that name: getattr gives the
    property's module, ``_modules`` the registered one."""

    def __init__(self):
        super().__init__()
        self.register_module("block", nn.Identity())
        self.other = nn.Linear(2, 2, bias=False)
        nn.init.eye_(self.other.weight)
        self.other.weight.data.mul_(2.0)

    @property
    def block(self):
        return self.other

    def forward(self, x):  # traced as a call of self.block (a leaf): target "block"
        return x


def _outer_then_block(outer: nn.Module) -> fx.GraphModule:
    """A graph module that calls ``outer``, then ``outer.block``: fx installs ``outer`` itself (the
    graph calls it), so the path to ``block`` goes through the user's class."""
    root = nn.Module()
    root.outer = outer
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("outer", (x,))
    graph.output(graph.call_module("outer.block", (y,)))
    return fx.GraphModule(root, graph)


def test_a_class_that_defines_the_name_keeps_getattr():
    """A path through a user's module (fx installs the module itself where the graph also calls
    it) whose class shadows a child keeps fx's ``getattr`` form, and calls what it called."""

    plain = _outer_then_block(_Shadowing())
    assert isinstance(plain.outer, _Shadowing)
    inp = torch.ones(1, 2)
    expected = plain(inp)
    torch.testing.assert_close(expected, 2 * inp)  # the property's layer, not the Identity
    direct_module_access(plain)
    assert "self._modules['outer'](x)" in plain.code
    assert "self.outer.block(" in plain.code
    torch.testing.assert_close(plain(inp), expected, rtol=0, atol=0)


class _Attrs(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 3))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.inner[0].weight) + self.inner[0].bias


def test_get_attr_reads_its_last_step_with_getattr():
    """``inner.0.weight`` is read as ``self._modules['inner']._modules['0'].weight``: a
    parametrization registered afterwards still applies."""
    torch.manual_seed(0)
    model = _Attrs()
    gm = direct_module_access(fx.symbolic_trace(model))
    assert "self._modules['inner']._modules['0'].weight" in gm.code
    assert "self._modules['inner']._modules['0'].bias" in gm.code
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = getattr(gm.inner, "0")
    parametrize.register_parametrization(layer, "weight", Double())
    expected = torch.nn.functional.linear(x, 2 * layer.parametrizations.weight.original)
    torch.testing.assert_close(gm(x), expected + layer.bias)


def test_deepcopy_keeps_it_and_pickling_round_trips():
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = _compile(model, "C4", x)
    with torch.no_grad():
        expected = gm(x)
    twin = copy.deepcopy(gm)
    for built in _built(twin):
        assert isinstance(built.graph._codegen, DirectModules)
        assert "getattr(self" not in built.code
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_other_code_generators_are_kept():
    """A graph with fx's pytree generator (inputs as a dict) keeps it: replacing it would drop
    the flattening of its inputs."""

    class TakesDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(2, 2))

        def forward(self, d):
            return self.seq(d["a"])

    gm = fx.symbolic_trace(TakesDict(), concrete_args={"d": {"a": fx.PH}})
    codegen = gm.graph._codegen
    assert type(codegen) is not CodeGen
    x = torch.randn(1, 2)
    expected = gm({"a": x})
    assert direct_module_access(gm).graph._codegen is codegen
    torch.testing.assert_close(gm({"a": x}), expected)


def test_a_class_that_overrides_attribute_lookup_keeps_getattr():
    class Redirect(nn.Module):  # getattr(self, "block") gives another module than _modules
        def __init__(self):
            super().__init__()
            self.block = nn.Identity()
            self.other = nn.Linear(2, 2, bias=False)
            nn.init.eye_(self.other.weight)
            self.other.weight.data.mul_(3.0)

        def __getattr__(self, name):
            if name == "block":
                return super().__getattr__("other")
            return super().__getattr__(name)

        def forward(self, x):
            return x

    gm = _outer_then_block(Redirect())
    inp = torch.ones(1, 2)
    expected = gm(inp)
    torch.testing.assert_close(expected, 3 * inp)
    direct_module_access(gm)
    assert "self.outer.block(" in gm.code
    torch.testing.assert_close(gm(inp), expected, rtol=0, atol=0)


def test_annotated_nodes_dying_values_and_readable_code():
    """Lines with type annotations, get_attr lines ending in fx's ``;  x = None``, and
    ``print_readable``'s verbose code are all rewritten, and the module still runs."""
    torch.manual_seed(0)
    model = _Attrs()
    gm = fx.symbolic_trace(model)
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr", "call_function"):
            node.type = torch.Tensor
    direct_module_access(gm)
    assert "getattr(self" not in gm.code and "self.inner" not in gm.code
    assert ": torch.Tensor = self._modules['inner']._modules['0'].weight" in gm.code
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    readable = gm.print_readable(print_output=False)
    assert "_modules['inner']" in readable and "getattr(self" not in readable
    nested = direct_module_access(fx.symbolic_trace(Nested()))
    assert "self._modules['body']._modules['0']._modules['0'](" in nested.code
