"""keep-channel-layout: between fused mixing layers the slots stay on the channel axis, and the
outputs are those of the fused layout without the pass, bitwise."""

from __future__ import annotations

import copy
import functools
import io
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import equivfx
import equivfx.passes.channel_layout as channel_layout
from equivfx.graphview import describe_graph
from equivfx.meta import REP, ChannelFolded
from equivfx.passes.mixing import channels_to_slots, slots_to_channels


def _without_pass(monkeypatch, model, spec="C4", **kwargs):
    """The same compile with keep-channel-layout doing nothing (the oracle)."""
    with monkeypatch.context() as m:
        m.setattr(
            channel_layout.KeepChannelLayout,
            "__call__",
            lambda self, gm: channel_layout.PassResult(gm, False),
        )
        return equivfx.compile(model, spec, mode="layerwise", mix_layout="fused", **kwargs)


def _with_pass(model, spec="C4", **kwargs):
    return equivfx.compile(model, spec, mode="layerwise", mix_layout="fused", **kwargs)


def _no_pass(monkeypatch):
    """``_without_pass`` with its monkeypatch bound (a compile function like ``_with_pass``)."""
    return lambda model, spec="C4", **kwargs: _without_pass(monkeypatch, model, spec, **kwargs)


def _flags(emodel) -> dict[str, dict]:
    """Each mixing layer's channel-layout flags (``mixer_call``'s arguments), by node name (a
    layer called through ``mixer_call`` by its module's name as fx names nodes)."""
    flags = {}
    for n in emodel.graph.nodes:
        if n.target is channel_layout.mixer_call:
            cin, cout = n.args[3:5]
            named = {"channels_in": cin, "channels_out": cout}
            flags[n.args[1].target.replace(".", "_")] = {k: v for k, v in named.items() if v}
        elif n.meta.get("equivfx.mixing"):
            flags[n.name] = {}
    return flags


def _reps(emodel) -> dict:
    """Each node's rep by name; a module the graph calls through ``channel_call`` by the
    module's name."""
    called = (channel_layout.channel_call, channel_layout.mixer_call)
    return {
        (n.args[1].target if n.target in called else n.name): n.meta.get(REP)
        for n in emodel.graph.nodes
    }


def _moves(emodel) -> list[str]:
    return [
        n.target.__name__
        for n in emodel.graph.nodes
        if n.op == "call_function" and n.target in (slots_to_channels, channels_to_slots)
    ]


class Convs(nn.Module):
    """3x3 convolutions named ``names``: the first from 2 channels, the others from ``c``, all
    to ``c``."""

    def __init__(self, *names: str, c: int = 4):
        super().__init__()
        for i, name in enumerate(names):
            setattr(self, name, nn.Conv2d(2 if i == 0 else c, c, 3, padding=1))


class Chain(nn.Module):
    def __init__(self, c=4, inplace=False):
        super().__init__()
        self.c1 = nn.Conv2d(2, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(c, c, 1)
        self.c4 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.pool(self.act(self.c2(x)))
        x = F.gelu(self.c3(x)) * 0.5
        return self.fc(torch.tanh(self.c4(x)).mean((2, 3)))


class Residual(nn.Module):
    def __init__(self, c=4, blocks=3, inplace_add=False):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(blocks))
        self.inplace_add = inplace_add
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for conv in self.convs:
            y = F.relu(conv(x))
            if self.inplace_add:
                y += x
                x = y
            else:
                x = x + y
        return self.fc(x.mean((2, 3)))


def _same(monkeypatch, model, x, spec="C4", grads=True, **kwargs):
    """The compiled model with and without the pass: outputs equal bitwise in eval mode and in
    training mode (dropout: from the same random state), gradients too (``grads="close"``: to
    float rounding, where autograd sums a value's terms in another order); returns the one with
    the pass."""
    torch.manual_seed(0)
    on = _with_pass(model, spec, **kwargs)
    off = _without_pass(monkeypatch, model, spec, **kwargs)
    off.load_state_dict(on.state_dict())
    for mode in (False, True):
        on.train(mode), off.train(mode)
        with torch.no_grad():
            assert torch.equal(_seeded(on, x), _seeded(off, x))
    if grads:
        outs = []
        for m in (on, off):
            m.zero_grad()
            _seeded(m, x).square().sum().backward()
            outs.append([p.grad for p in m.parameters()])
        for a, b in zip(*outs, strict=True):
            if grads == "close" and a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            else:
                assert (a is None and b is None) or torch.equal(a, b)
    on.eval()
    return on


def _seeded(model, x):
    torch.manual_seed(1)
    return model(x)


def test_the_moves_round_trip_exactly():
    s = torch.arange(4 * 3 * 2 * 5, dtype=torch.float64).view(4 * 3, 2, 5)
    c = slots_to_channels(s, 4)
    assert c.shape == (3, 8, 5)
    # channel block i of sample b is slot i's sample b
    for i in range(4):
        assert torch.equal(c[:, 2 * i : 2 * i + 2], s[3 * i : 3 * i + 3])
    assert torch.equal(channels_to_slots(c, 4), s)
    # the feature layout of linear layers: the blocks on the last axis
    f = slots_to_channels(s, 4, -1)
    assert f.shape == (3, 2, 20)
    for i in range(4):
        assert torch.equal(f[..., 5 * i : 5 * i + 5], s[3 * i : 3 * i + 3])
    assert torch.equal(channels_to_slots(f, 4, -1), s)
    # two dimensions: one layout
    assert torch.equal(slots_to_channels(s[:, 0], 4, -1), slots_to_channels(s[:, 0], 4))


def test_a_chain_of_fused_layers_keeps_the_channel_layout(monkeypatch):
    model = Chain().eval()
    x = torch.randn(3, 2, 8, 8)
    on = _same(monkeypatch, model, x)
    # c1 reads the lifted input (the input stage): a plain layer. c2 moves in, c4 moves out, fc
    # is a mixing linear layer (no channel layout)
    assert _flags(on) == {
        "c2": {"channels_out": True},
        "c3": {"channels_in": True, "channels_out": True},
        "c4": {"channels_in": True},
        "fc": {},
    }
    assert _moves(on) == []
    reps = _reps(on)
    for name in ("c2", "act", "pool", "c3", "gelu", "mul"):
        assert reps[name] == ChannelFolded(4), name
    rows = {r["node"]: r for r in describe_graph(on)}
    assert rows["mul"]["slot_axis"] == 1 and "channels" in rows["mul"]["rep"]
    assert "keep-channel-layout" in on.equivfx_info.passes
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


def test_residual_sums_move_the_stream_in_once(monkeypatch):
    model = Residual().eval()
    x = torch.randn(2, 2, 8, 8)
    on = _same(monkeypatch, model, x)
    # the stem's output (folded slots) moves in once and feeds the first layer and the first sum;
    # the last sum's operands leave the region (the mean reads them)
    assert _moves(on).count("slots_to_channels") == 1
    assert _flags(on)["convs_0"] == {"channels_in": True, "channels_out": True}
    assert _flags(on)["convs_1"] == {"channels_in": True, "channels_out": True}
    assert _flags(on)["convs_2"] == {"channels_in": True}
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


def test_in_place_activations_and_sums_keep_their_values(monkeypatch):
    _same(monkeypatch, Chain(inplace=True).eval(), torch.randn(2, 2, 8, 8))
    on = _same(monkeypatch, Residual(inplace_add=True).eval(), torch.randn(2, 2, 8, 8))
    # y += x writes into the moved stream's reader, never into the moved copy: x's copy is read
    # by the first sum and that sum is not in place on it
    assert any(f for f in _flags(on).values())


class ViewThenWrite(Convs):
    """Reads c2's output through a view outside the region, then writes c2's output in place:
    the view must see the write."""

    def __init__(self):
        super().__init__("c1", "c2", "c3")

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        flat = y.view(y.shape[0], -1)  # an alias, read after the write below
        y.relu_()
        z = self.c3(y)
        return z.mean((1, 2, 3)) + flat.sum(1)


def test_a_value_read_outside_before_a_write_stays_in_folded_slots(monkeypatch):
    on = _same(monkeypatch, ViewThenWrite().eval(), torch.randn(2, 2, 6, 6), grads=False)
    assert _flags(on)["c2"] == {}  # c2's output is read by the view before relu_ writes it


class WriteBeforeTheSum(Convs):
    """The residual stream is written in place between its first reader and the sum: a copy
    moved in when it was computed would miss the write."""

    def __init__(self):
        super().__init__("stem", "c1", "c2")

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.relu(self.c1(s))
        s.mul_(2.0)
        return self.c2(s + y).mean((1, 2, 3))


def test_a_stream_written_after_it_is_computed_is_not_moved_in(monkeypatch):
    on = _same(monkeypatch, WriteBeforeTheSum().eval(), torch.randn(2, 2, 6, 6), grads=False)
    assert "slots_to_channels" not in _moves(on)


class WriteAsAStatement(Convs):
    """``y.relu_()`` with its result unread: the write is the value's only reader besides c3."""

    def __init__(self):
        super().__init__("c1", "c2", "c3")

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        y.relu_()
        return self.c3(y).mean((1, 2, 3))


class WriteOutsideWithOut(WriteAsAStatement):
    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        torch.add(y, 1.0, out=y)  # a write the region does not keep, into the value itself
        return self.c3(y).mean((1, 2, 3))


def test_a_write_in_place_as_a_statement_reaches_the_next_layer(monkeypatch):
    on = _same(monkeypatch, WriteAsAStatement().eval(), torch.randn(2, 2, 6, 6))
    # the write is kept in the region, so c2 -> c3 still keeps the layout
    assert _flags(on)["c3"] == {"channels_in": True}
    on = _same(monkeypatch, WriteOutsideWithOut().eval(), torch.randn(2, 2, 6, 6), grads=False)
    assert _flags(on)["c3"] == {}


class ReadThenWrite(Convs):
    """c3 reads c2's output, then relu_ writes it: c3 saved it for its weight's gradient."""

    def __init__(self):
        super().__init__("c1", "c2", "c3", "c4")

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        z = self.c3(y)
        return self.c4(y.relu_() + z).mean((1, 2, 3))


def test_a_layer_reading_a_value_written_later_keeps_backward_working(monkeypatch):
    on = _same(monkeypatch, ReadThenWrite(), torch.randn(2, 2, 6, 6))
    assert _flags(on)["c3"] == {}  # c3 reads c2's output in folded slots, through its own copy


class _FlipSum(nn.Module):
    """Not traceable (data-dependent control flow): an opaque leaf that mixes the channels."""

    def forward(self, a, b):
        if bool(a.sum() != 12345.0):
            return a + b.flip(1)
        return a


class ModuleNamedAdd(Convs):
    def __init__(self):
        super().__init__("c1", "c2", "c3")
        self.add = _FlipSum()
        self.c4 = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.c4(self.add(self.c2(h), self.c3(h))).flatten(1)


def test_a_module_named_like_a_sum_is_not_one(monkeypatch):
    torch.manual_seed(0)
    model = ModuleNamedAdd().eval()
    x = torch.randn(2, 2, 6, 6)
    on = _with_pass(model, readout="slots")
    off = _without_pass(monkeypatch, model, readout="slots")
    with torch.no_grad():
        assert torch.equal(on(x), off(x))
    kept = {n.name for n in on.graph.nodes if isinstance(n.meta.get(REP), ChannelFolded)}
    assert "add" not in kept


class ReadTwiceOutside(Convs):
    def __init__(self):
        super().__init__("c1", "c2", "c3", c=3)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        side = torch.cat([y, y], 1).mean((1, 2, 3))
        return self.c3(torch.tanh(y)).mean((1, 2, 3)) + side


def test_gradients_are_equal_up_to_the_order_autograd_sums_them(monkeypatch):
    # y's gradient has three terms; moved back once for the cat, two of them are summed first
    torch.manual_seed(0)
    model = ReadTwiceOutside()
    x = torch.randn(2, 2, 6, 6)
    on, off = _with_pass(model), _without_pass(monkeypatch, model)
    assert torch.equal(on(x), off(x))
    for m in (on, off):
        m(x).square().sum().backward()
    for a, b in zip(on.parameters(), off.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


class Mixed(nn.Module):
    """Ops that do not keep the layout: PReLU with a weight per channel, a product with a
    one-channel gate (it broadcasts over the channels of a slot, not of all slots), softmax over
    channels, a batch norm called twice (its replacement would read one layout only)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.prelu = nn.PReLU(4)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 1, 1)
        self.bn = nn.BatchNorm2d(4)
        self.c4 = nn.Conv2d(4, 4, 3, padding=1)
        self.c5 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.c3(self.prelu(self.c2(x)))
        x = self.c4(x * torch.sigmoid(self.gate(x)))
        x = self.c5(self.bn(torch.softmax(x, 1)))
        return self.bn(x).mean((1, 2, 3))


def test_ops_that_do_not_keep_the_layout_end_it(monkeypatch):
    on = _same(monkeypatch, Mixed().eval(), torch.randn(2, 2, 6, 6))
    # only c3 -> gate (a fused layer reading another's output) keeps it; the product reads c3's
    # output moved back to folded slots
    assert _flags(on) == {
        "c2": {},
        "c3": {"channels_out": True},
        "gate": {"channels_in": True},
        "c4": {},
        "c5": {},
    }
    assert _moves(on) == ["channels_to_slots"]
    reps = _reps(on)
    dropped = ("prelu", "sigmoid", "mul", "softmax", "bn", "bn_1")
    assert not any(isinstance(reps[k], ChannelFolded) for k in dropped)


class WithNorms(nn.Module):
    """conv -> batch norm -> relu blocks with a residual sum, as in a ResNet."""

    def __init__(self, dim=2):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
        norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
        self.stem = conv(2, 4, 3, padding=1)
        self.c1, self.c2, self.c3 = (conv(4, 4, 3, padding=1) for _ in range(3))
        self.b1, self.b2, self.b3 = norm(4), norm(4, affine=False), norm(4)
        self.short = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = self.short(h) + F.relu(self.b1(self.c1(h)))
        h = F.relu(self.b2(self.c2(h)))
        return self.fc(self.c3(self.b3(h)).flatten(2).mean(-1))  # a norm right before a layer


@pytest.mark.parametrize("dim, spec, size", [(1, "ShiftRev4", 8), (2, "C4", 5), (3, "D4", 4)])
def test_batch_norms_keep_the_layout_in_eval_and_training(monkeypatch, dim, spec, size):
    torch.manual_seed(0)
    model = WithNorms(dim)
    with torch.no_grad():  # running statistics that are not the defaults
        for bn in (model.b1, model.b2, model.b3):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, *(size,) * dim)
    on = _same(monkeypatch, model, x, spec)  # bitwise in eval and in training, gradients too
    assert _flags(on) == {
        "c1": {"channels_in": True, "channels_out": True},
        "c2": {"channels_in": True, "channels_out": True},
        "c3": {"channels_in": True},
        "fc": {},
    }
    # the stem's output moves in once, for c1 and the identity shortcut alike
    assert _moves(on) == ["slots_to_channels"]
    # the user's batch norms, called through the channel layout
    calls = [n.args[1].target for n in on.graph.nodes if n.target is channel_layout.channel_call]
    assert [t for t in calls if t.startswith("b")] == ["b1", "b2", "b3"]
    assert on.get_submodule("b1") is model.b1 and type(model.b1) is type(model.b2)
    assert on.state_dict().keys() == _without_pass(monkeypatch, model, spec).state_dict().keys()
    # training updates the running statistics as the module does on folded slots
    off = _without_pass(monkeypatch, copy.deepcopy(model), spec)
    on.train(), off.train()
    on(x), off(x)
    for (k, a), (_, b) in zip(on.state_dict().items(), off.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    on.eval()
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


class WriteThroughShortcut(Convs):
    """An Identity shortcut returns its input: a write into it writes the stem's output, which
    c1 and the last mean read too."""

    def __init__(self):
        super().__init__("stem", "c1", "c2")
        self.short = nn.Identity()

    def forward(self, x):
        h = self.stem(x)
        t = self.short(h)
        t.relu_()
        return self.c2(self.c1(h) + t).mean((1, 2, 3)) + h.mean((1, 2, 3))


def test_a_write_through_a_shortcut_reaches_every_reader(monkeypatch):
    _same(monkeypatch, WriteThroughShortcut().eval(), torch.randn(2, 2, 6, 6), grads=False)


class Hooked(Convs):
    def __init__(self):
        super().__init__("stem", "c1", "c2")
        self.bn, self.act = nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.c2(self.act(self.bn(self.c1(F.relu(self.stem(x)))))).mean((1, 2, 3))


def _per_channel(module, inputs, output):
    return output * torch.arange(1.0, 1 + output.shape[1]).view(1, -1, 1, 1)


@pytest.mark.parametrize("hooked", ["bn", "act"])
def test_modules_with_hooks_keep_the_folded_slots(monkeypatch, hooked):
    model = Hooked().eval()
    shapes = []
    module = getattr(model, hooked)
    module.register_forward_pre_hook(lambda m, i: shapes.append(tuple(i[0].shape)))
    module.register_forward_hook(_per_channel)
    on = _same(monkeypatch, model, torch.randn(2, 2, 6, 6))
    assert set(shapes) == {(8, 4, 6, 6)}  # (|G| B, C, ...), as without the pass
    assert _flags(on) == {"c1": {}, "c2": {}}


def test_modules_hooked_or_replaced_after_compiling_see_folded_slots(monkeypatch):
    torch.manual_seed(0)
    model = Hooked().eval()
    x = torch.randn(2, 2, 6, 6)
    on, off = _with_pass(model), _without_pass(monkeypatch, model)
    assert _flags(on) == {"c1": {"channels_out": True}, "c2": {"channels_in": True}}
    with torch.no_grad():
        assert torch.equal(on(x), off(x))
        seen = {"on": [], "off": []}
        for name, m in (("on", on), ("off", off)):  # features, sample by sample, as before
            handles = [
                m.bn.register_forward_hook(lambda mod, i, o, k=name: seen[k].append(o.clone())),
                m.act.register_forward_hook(_per_channel),
                m.bn.register_forward_hook(
                    lambda mod, i, o: o * torch.arange(1.0, 1 + o.shape[0]).view(-1, 1, 1, 1)
                ),
            ]
            seen[name].append(m(x))
            for h in handles:
                h.remove()
        assert all(torch.equal(a, b) for a, b in zip(seen["on"], seen["off"], strict=True))
        # a batch norm folded away after compiling, an in-place activation hooked later
        for m in (on, off):
            m.bn = nn.Identity()
            m.act.inplace = True
            m.act.register_forward_pre_hook(lambda mod, i: None)
        assert torch.equal(on(x), off(x))


class InPlaceBranch(Convs):
    """An in-place ReLU on c1's output, which c3 reads too."""

    def __init__(self):
        super().__init__("stem", "c1", "c2", "c3")
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c1(F.relu(self.stem(x)))
        z = self.act(y)
        return (self.c2(z) + self.c3(y)).mean((1, 2, 3))


class _ReluInPlace(nn.Module):
    def forward(self, x):
        return x.relu_()


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.act.register_forward_hook(lambda mod, i, o: o * 2),
        lambda m: m.act.register_forward_pre_hook(lambda mod, i: (-i[0],)),
        lambda m: setattr(m, "act", _ReluInPlace()),
    ],
    ids=["hook-on-output", "hook-on-input", "replaced"],
)
def test_an_in_place_module_changed_after_compiling_writes_what_it_wrote(monkeypatch, change):
    torch.manual_seed(0)
    model = InPlaceBranch()
    x = torch.randn(2, 2, 6, 6)
    on, off = _with_pass(model), _without_pass(monkeypatch, model)
    assert _flags(on)["c1"] == {"channels_out": True}
    for m in (on, off):
        change(m)
    for mode in (False, True):
        on.train(mode), off.train(mode)
        with torch.no_grad():
            assert torch.equal(on(x), off(x))
    grads = []
    for m in (on, off):
        m(x).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_loaded_module_still_calls_kept_modules_through_channel_call():
    on = _with_pass(WithNorms().eval())
    buf = io.BytesIO()
    torch.save(on, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # fx traces the saved code again
    for fn in (channel_layout.channel_call, channel_layout.mixer_call):
        calls = [n for n in loaded.graph.nodes if n.target is fn]
        assert calls and len(calls) == len([n for n in on.graph.nodes if n.target is fn])
    x = torch.randn(2, 2, 5, 5)
    seen = {}
    for name, m in (("on", on), ("loaded", loaded)):
        m.b1.register_forward_hook(lambda mod, i, o, k=name: seen.setdefault(k, o.clone()))
        with torch.no_grad():
            m(x)
    assert torch.equal(seen["on"], seen["loaded"])


def test_mixing_layers_hooked_after_compiling_see_folded_slots(monkeypatch):
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(2, 2, 8, 8)
    on, off = _with_pass(model), _without_pass(monkeypatch, model)
    assert _flags(on)["c3"] == {"channels_in": True, "channels_out": True}
    seen = {"on": [], "off": []}
    for name, m in (("on", on), ("off", off)):
        m.c3.register_forward_hook(lambda mod, i, o, k=name: seen[k].append((i[0].clone(), o)))
        m.c3.register_forward_hook(_per_channel)
    with torch.no_grad():
        assert torch.equal(on(x), off(x))
    (i_on, o_on), (i_off, o_off) = seen["on"][0], seen["off"][0]
    assert i_on.shape == (4 * 2, 4, 4, 4) and torch.equal(i_on, i_off) and torch.equal(o_on, o_off)
    # global hooks added after compiling: every module, the mixing layers too, as before
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: (
            _per_channel(mod, i, o) if isinstance(o, torch.Tensor) and o.dim() == 4 else o
        )
    )
    try:
        with torch.no_grad():
            assert torch.equal(on(x), off(x))
    finally:
        handle.remove()


def test_global_hooks_at_compile_time_keep_the_folded_slots():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        on = _with_pass(Chain().eval())
    finally:
        handle.remove()
    assert all(flags == {} for flags in _flags(on).values())


class _NormsInside(nn.Module):
    """Not traceable: an opaque leaf that calls its own batch norm."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, a):
        return self.bn(a) if bool(a.sum() != 1e9) else a


class SharedNorm(Convs):
    def __init__(self):
        super().__init__("stem", "c1", "c2")
        self.block = _NormsInside()

    def forward(self, x):
        y = self.c2(F.relu(self.block.bn(self.c1(F.relu(self.stem(x))))))
        return self.block(y).mean((1, 2, 3))


def test_a_batch_norm_a_leaf_also_calls_stays_the_users(monkeypatch):
    model = SharedNorm().eval()
    on = _same(monkeypatch, model, torch.randn(2, 2, 6, 6))
    assert type(model.block.bn) is nn.BatchNorm2d
    assert _flags(on)["c2"] == {"channels_in": True}


def test_other_layouts_and_optimize_false_leave_the_graph_alone():
    model = Chain().eval()
    gather = equivfx.compile(model, "C4", mode="layerwise")
    plain = equivfx.compile(model, "C4", mode="layerwise", mix_layout="fused", optimize=False)
    for emodel in (gather, plain):
        assert "keep-channel-layout" not in emodel.equivfx_info.passes
        assert all(flags == {} for flags in _flags(emodel).values())


def test_the_flags_need_the_fused_layout():
    G = equivfx.group("C4")
    layer = equivfx.passes.mixing.widen(nn.Conv2d(2, 2, 3), G.order, group=G, layout="gather")
    with pytest.raises(equivfx.errors.EquivFXError, match="fused layout"):
        layer(torch.randn(4, 2, 5, 5), channels_out=True)


def test_the_verifier_locates_a_broken_op_inside_the_region(monkeypatch):
    model = Chain().eval()
    x = torch.randn(2, 2, 8, 8)
    on = _with_pass(model)
    node = next(n for n in on.graph.nodes if n.name == "gelu")
    assert node.meta[REP] == ChannelFolded(4)
    node.target = _gelu_then_weigh  # not equivariant: weighs the slots' channel blocks apart
    on.recompile()
    report = equivfx.verify(on, x, rtol=1e-4, atol=1e-5)
    assert not report.ok and report.first_bad_node == "gelu"


def _gelu_then_weigh(t):
    # (G permutes the channel blocks; an op acting on each block alike would commute with that)
    return F.gelu(t) * torch.arange(t.shape[1], dtype=t.dtype).view(1, -1, 1, 1)


class Tokens(nn.Module):
    """Linear layers on the last axis: of (B, 2, 16) tokens (``tokens=True``), or of (B, 32)."""

    def __init__(self, tokens=True, f=6, norm=False):
        super().__init__()
        self.tokens = tokens
        self.stem = nn.Linear(16 if tokens else 32, f)
        self.l1, self.l2, self.l3 = (nn.Linear(f, f) for _ in range(3))
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm1d(f) if norm else nn.Identity()

    def forward(self, x):
        t = x.flatten(2) if self.tokens else x.flatten(1)
        h = F.relu(self.stem(t))
        h = h + F.gelu(self.bn(self.l1(h)))  # the stream moves in once, feeds l1 and the sum
        h = torch.tanh(self.l2(self.act(h))) * 0.5
        out = self.l3(h)
        return out.mean(1) if self.tokens else out


@pytest.mark.parametrize(
    "model, size",
    [(Residual().eval(), 8), (WithNorms().eval(), 8), (Tokens().eval(), 4)],
    ids=["residual", "norms", "linear"],
)
def test_pickles_copies_and_exports(model, size):
    x = torch.randn(3, 2, size, size)
    on = _with_pass(model)
    assert any(_flags(on).values())
    with torch.no_grad():
        want = on(x)
        buf = io.BytesIO()
        torch.save(on, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), want)
        assert torch.equal(copy.deepcopy(on)(x), want)
    batch = torch.export.Dim("batch", max=1024)
    ep = torch.export.export(on, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        for n in (1, 5):
            xs = torch.randn(n, 2, size, size)
            torch.testing.assert_close(ep.module()(xs), on(xs))


# ------------------------------------------------------------------ linear layers
@pytest.mark.parametrize("tokens", [True, False])
@pytest.mark.parametrize("shapes", [False, True])
def test_linear_layers_keep_their_feature_layout(monkeypatch, tokens, shapes):
    x = torch.randn(3, 2, 4, 4)
    kwargs = {"example_inputs": x} if shapes else {}
    on = _same(monkeypatch, Tokens(tokens).eval(), x, **kwargs)
    assert _flags(on) == {
        "l1": {"channels_in": True, "channels_out": True},
        "l2": {"channels_in": True, "channels_out": True},
        "l3": {"channels_in": True},
    }
    assert _moves(on) == ["slots_to_channels"]  # the stream, once
    # (B, ..., |G| F): the blocks on the last axis, whatever the example inputs' rank
    reps = _reps(on)
    for name in ("l1", "gelu", "add", "act", "l2", "tanh", "mul"):
        assert reps[name] == ChannelFolded(4, -1), name
    rows = {r["node"]: r for r in describe_graph(on)}
    assert rows["mul"]["slot_axis"] == -1 and "features" in rows["mul"]["rep"]
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


@pytest.mark.parametrize("shapes", [False, True])
def test_a_batch_norm_on_features_keeps_the_layout_where_it_is_two_dimensional(monkeypatch, shapes):
    x = torch.randn(3, 2, 4, 4)
    kwargs = {"example_inputs": x} if shapes else {}
    on = _same(monkeypatch, Tokens(tokens=False, norm=True).eval(), x, **kwargs)
    # without shapes the rank is unknown: (B, L, |G| F) would put the blocks off the norm's
    # channel axis, so it stays on folded slots and ends the region there
    assert (_reps(on)["bn"] == ChannelFolded(4, -1)) == shapes
    assert _flags(on)["l1"] == ({"channels_in": True, "channels_out": True} if shapes else {})
    assert _flags(on)["l3"] == {"channels_in": True}


class AnyRank(nn.Module):
    """Linear layers on the last axis of (B, F) or (B, L, F); ``residual``: the stream moves in
    once; otherwise a kept value is also read outside (a copy moves back)."""

    def __init__(self, residual):
        super().__init__()
        self.residual = residual
        self.l0, self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        h = F.relu(self.l0(x))
        if self.residual:
            h = h + self.act(self.l1(h))
            return self.l2(h)
        t = torch.tanh(self.l1(h))
        return self.l2(t) + t.mean(-1, keepdim=True)


@pytest.mark.parametrize("residual", [False, True])
def test_a_graph_compiled_on_two_dimensions_runs_on_three(monkeypatch, residual):
    # the moves take the feature layout on the last axis at any rank (they took the channel
    # axis where the example inputs were 2-D: 0.06 off, or a crash, on (B, L, F))
    torch.manual_seed(0)
    model = AnyRank(residual).eval()
    kwargs = {"example_inputs": torch.randn(3, 8)}
    on, off = (
        _with_pass(model, "ShiftRev4", **kwargs),
        _without_pass(monkeypatch, model, "ShiftRev4", **kwargs),
    )
    assert any(_flags(on).values())
    with torch.no_grad():
        for x in (torch.randn(3, 8), torch.randn(3, 5, 8), torch.randn(2, 3, 4, 8)):
            assert torch.equal(on(x), off(x))


class TokensWithNorm(nn.Module):
    """A batch norm between linear layers, kept where the example inputs are 2-D."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.l2(self.bn(self.l1(F.relu(self.l0(x)))))


def test_a_batch_norm_kept_on_two_dimensions_checks_the_rank_at_each_call(monkeypatch):
    torch.manual_seed(0)
    model = TokensWithNorm().eval()
    model.bn.running_mean.uniform_(-1, 1)
    kwargs = {"example_inputs": torch.randn(3, 8)}
    on, off = (
        _with_pass(model, "ShiftRev4", **kwargs),
        _without_pass(monkeypatch, model, "ShiftRev4", **kwargs),
    )
    assert _reps(on)["bn"] == ChannelFolded(8, -1)
    with torch.no_grad():  # BatchNorm1d on (B, C, L) normalises axis 1: 6 tokens of 8 features
        for x in (torch.randn(3, 8), torch.randn(3, 6, 8)):
            assert torch.equal(on(x), off(x))


class IdentityBesideLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.l1, self.l2 = nn.Linear(16, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.idn = nn.Identity()

    def forward(self, x):
        t = F.relu(self.stem(x.flatten(2)))  # (B, 2, 6)
        return self.l2(F.relu(self.l1(t) + self.idn(t))).mean(1)


@pytest.mark.parametrize("shapes", [False, True])
def test_a_shortcut_beside_a_linear_layer_moves_into_its_layout(monkeypatch, shapes):
    # with shapes the shortcut's input could take a convolution's layout (its axis 1) too; it
    # takes the one the linear layer reading it takes
    x = torch.randn(3, 2, 4, 4)
    kwargs = {"example_inputs": x} if shapes else {}
    on = _same(monkeypatch, IdentityBesideLinear().eval(), x, **kwargs)
    assert _flags(on) == {
        "l1": {"channels_in": True, "channels_out": True},
        "l2": {"channels_in": True},
    }
    assert _moves(on) == ["slots_to_channels"]


class Head(nn.Module):
    """A VGG-style classifier head: linear layers with ReLUs and dropout between them; and a
    convolution block with Dropout2d."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(2, 4, 3, padding=1),
            *(nn.Conv2d(4, 4, 3) for _ in range(2)),
        )
        self.drop2d = nn.Dropout2d(0.5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 5)
        self.drop1, self.drop2 = nn.Dropout(0.5), nn.Dropout(0.5, inplace=True)

    def forward(self, x):
        h = self.c3(self.drop2d(F.relu(self.c2(F.relu(self.c1(x))))))
        h = F.relu(self.fc1(h.flatten(1)))
        h = self.drop1(h)
        h = F.relu(self.drop2(self.fc2(h) + 0.5))  # (a ReLU's output written would fail backward)
        return self.fc3(h)


def test_dropout_keeps_the_layout_and_draws_the_masks_it_drew(monkeypatch):
    x = torch.randn(3, 2, 6, 6)
    on = _same(monkeypatch, Head().eval(), x)  # training: the same masks from the same state
    assert _flags(on) == {
        "c2": {"channels_out": True},
        "c3": {"channels_in": True},
        "fc1": {"channels_out": True},
        "fc2": {"channels_in": True, "channels_out": True},
        "fc3": {"channels_in": True},
    }
    reps = _reps(on)
    assert reps["drop2d"] == ChannelFolded(4) and reps["drop2"] == ChannelFolded(4, -1)
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


class PreNorm(nn.Module):
    """Pre-norm residual MLP blocks on tokens, as in a transformer, and a final norm."""

    def __init__(self, f=8, norm=nn.LayerNorm):
        super().__init__()
        self.stem = nn.Linear(16, f)
        self.norms = nn.ModuleList(norm(f) for _ in range(2))
        self.fc1 = nn.ModuleList(nn.Linear(f, 2 * f) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(2 * f, f) for _ in range(2))
        self.final, self.head = norm(f), nn.Linear(f, 3)

    def forward(self, x):
        h = self.stem(x.flatten(2))
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2, strict=True):
            h = h + fc2(F.gelu(fc1(norm(h))))
        return self.head(self.final(h)).mean(1)


@pytest.mark.parametrize("shapes", [False, True])
@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_norms_of_the_features_keep_the_layout(monkeypatch, norm, shapes):
    x = torch.randn(3, 2, 4, 4)
    kwargs = {"example_inputs": x} if shapes else {}  # (B, 2, 8): a convolution's layout too
    # the stream is read by the sum and (moved back in training) the norm, which as an RMS norm
    # reads its input twice: three gradient terms, summed in another order
    grads = True if norm is nn.LayerNorm else "close"
    on = _same(monkeypatch, PreNorm(norm=norm).eval(), x, grads=grads, **kwargs)
    # the stream moves in once, before the first norm; nothing moves back until the head's mean
    assert _moves(on) == ["slots_to_channels"]
    assert all(flags.get("channels_in") for flags in _flags(on).values())
    reps = _reps(on)
    assert all(reps[k] == ChannelFolded(4, -1) for k in ("norms.0", "norms.1", "final"))
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


class NormsOfOtherAxes(PreNorm):
    """Norms over the tokens and features together, and a norm of the features of a
    convolution's (B, C, H, W) output (its last axis is W)."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm((2, 8)), nn.RMSNorm((2, 8))])


class FunctionalNorm(nn.LayerNorm):
    """A layer norm with its own forward, as timm's: fx traces it into ``F.layer_norm`` (or
    ``F.rms_norm``) with the weights as ``get_attr`` arguments."""

    def __init__(self, f, fn, affine=True):
        super().__init__(f, elementwise_affine=affine)
        self.fn = fn

    def forward(self, x):
        if self.fn is F.rms_norm:
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm])
def test_functional_norms_of_the_features_keep_the_layout(monkeypatch, fn, affine):
    x = torch.randn(3, 2, 4, 4)
    model = PreNorm(norm=lambda f: FunctionalNorm(f, fn, affine)).eval()
    with torch.no_grad():  # weights that matter; off autograd: the layout's view (B, ..., |G|, F)
        for m in model.modules():
            if isinstance(m, FunctionalNorm) and affine:
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    on = _same(monkeypatch, model, x, grads="close")  # with autograd: moved back and forth
    called = [n.args[1] for n in on.graph.nodes if n.target is channel_layout.row_norm_call]
    assert called == [fn.__name__] * 3
    # as with the modules: the stream moves in once, before the first norm
    assert _moves(on) == ["slots_to_channels"]
    assert _reps(on)["layer_norm" if fn is F.layer_norm else "rms_norm"] == ChannelFolded(4, -1)
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


@pytest.mark.parametrize("fn", [F.layer_norm, F.rms_norm])
def test_functional_norms_pickle_copy_and_export(fn):
    test_pickles_copies_and_exports(PreNorm(norm=lambda f: FunctionalNorm(f, fn)).eval(), 4)


class StridedStream(nn.Module):
    """A ViT-like stream: patch tokens as a transposed view, residual pre-norm blocks (the stream
    moves in once), then an op that computes in its input's memory order on a value computed
    from the stream: an RMS norm (its sums of squares) or dropout (its masks)."""

    def __init__(self, op, d=8):
        super().__init__()
        self.patch = nn.Conv2d(2, d, 2, stride=2)  # the input stage: not a mixing layer
        self.n1, self.op = nn.LayerNorm(d), op
        self.fc1, self.fc2, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, T, D), a transposed view
        t = t + self.fc1(self.n1(t))  # eager sums hand the view's strides on
        t = t + self.fc2(self.op(t))
        return self.head(t).mean(1)


@pytest.mark.parametrize("shapes", [False, True])
@pytest.mark.parametrize(
    "op",
    [
        lambda: nn.RMSNorm(8),
        lambda: FunctionalNorm(8, F.rms_norm),
        lambda: nn.Dropout(0.5),
        lambda: nn.LayerNorm(8),
    ],
    ids=["rms", "functional-rms", "dropout", "layer-norm"],
)
def test_ops_in_memory_order_see_the_strides_they_saw(monkeypatch, op, shapes):
    # a contiguous copy of the stream moved in changed an RMS norm's last bits (1.5e-8) and
    # would draw other dropout masks: the stream stays in folded slots where such an op reads
    # a value computed from it; a layer norm makes its input contiguous first: it moves in
    x = torch.randn(3, 2, 8, 8)
    kwargs = {"example_inputs": x} if shapes else {}
    on = _same(monkeypatch, StridedStream(op()).eval(), x, grads="close", **kwargs)
    kept = isinstance(_reps(on).get("op", _reps(on).get("rms_norm")), ChannelFolded)
    # (without example inputs the transposed tokens' layout is unknown: nothing moves in)
    assert kept == (isinstance(on.op, nn.LayerNorm) and shapes), _reps(on)


def test_a_contiguous_stream_still_moves_in_before_an_rms_norm(monkeypatch):
    on = _same(monkeypatch, PreNorm(norm=nn.RMSNorm).eval(), torch.randn(3, 2, 4, 4), grads="close")
    assert _moves(on) == ["slots_to_channels"]  # a linear layer's output: contiguous


class SpatialNorm(nn.Module):
    """Functional layer norms over a convolution's spatial axes (rows within one channel),
    and one over its channels too (which ends the layout)."""

    def __init__(self, over_channels=False):
        super().__init__()
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(2 if i == 0 else 4, 4, 3, padding=1) for i in range(3)
        )
        self.w = nn.Parameter(torch.randn(6, 6))
        self.over_channels = over_channels

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        shape = (4, 6, 6) if self.over_channels else (6, 6)
        h = F.layer_norm(h, shape, self.w if not self.over_channels else None)
        return self.c3(h).mean((1, 2, 3))


@pytest.mark.parametrize("over_channels", [False, True])
def test_functional_norms_of_spatial_axes_keep_a_convolutions_layout(monkeypatch, over_channels):
    x = torch.randn(3, 2, 6, 6)
    on = _same(monkeypatch, SpatialNorm(over_channels).eval(), x, grads="close")
    kept = {"c2": {"channels_out": True}, "c3": {"channels_in": True}}
    assert _flags(on) == ({"c2": {}, "c3": {}} if over_channels else kept)
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


def test_norms_of_other_axes_end_the_layout(monkeypatch):
    x = torch.randn(3, 2, 4, 4)
    on = _same(monkeypatch, NormsOfOtherAxes().eval(), x, grads="close")  # read in and outside
    reps = _reps(on)
    assert not any(isinstance(reps[k], ChannelFolded) for k in ("norms_0", "norms_1"))


class WriteThroughDropout(nn.Module):
    """Writes in place into a dropout's output, which is its input where the dropout returns it
    (p = 0, or eval mode): both readers see the write."""

    def __init__(self, p):
        super().__init__()
        self.stem, self.l1 = nn.Linear(16, 8), nn.Linear(8, 8)
        self.l2, self.l3 = nn.Linear(8, 3), nn.Linear(8, 3)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h = self.l1(self.stem(x.flatten(2)))
        d = self.drop(h)
        d.relu_()
        return (self.l2(h) + self.l3(d)).mean(1)


def test_a_module_returning_its_input_returns_the_layout_itself(monkeypatch):
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        # dropout with p = 0 in training: called on the slots moved back, it returns them
        on, off = (f(WriteThroughDropout(0.0).train()) for f in (_with_pass, _no_pass(monkeypatch)))
        off.load_state_dict(on.state_dict())
        assert torch.equal(on(x), off(x))  # was 0.19 off: the write went into a copy
        # in eval mode with a hook added later (the fallback), as a profiler's global hook does
        on, off = (f(WriteThroughDropout(0.5).eval()) for f in (_with_pass, _no_pass(monkeypatch)))
        off.load_state_dict(on.state_dict())
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            assert torch.equal(on(x), off(x))
        finally:
            handle.remove()


class FunctionalDropout(nn.Module):
    """Functional dropout between fused layers: ``training=self.training`` (read at each call),
    or ``training=True`` written out."""

    def __init__(self, drop, training=None):
        super().__init__()
        self.drop, self.training_flag = drop, training
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(2 if i == 0 else 4, 4, 3, padding=1) for i in range(3)
        )
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        flag = self.training if self.training_flag is None else self.training_flag
        h = self.drop(F.relu(self.c2(F.relu(self.c1(x)))), 0.3, flag)
        flag_name = "train" if self.drop is torch.dropout else "training"  # as a keyword too
        h = self.drop(self.c3(h), 0.3, **{flag_name: flag}).mean((2, 3))
        return self.fc2(F.dropout(F.gelu(self.fc1(h)), 0.3, flag))


@pytest.mark.parametrize(
    "drop", [F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout]
)
@pytest.mark.parametrize("compiled_in", ["eval", "train"])
def test_functional_dropout_reading_its_flag_keeps_the_layout(monkeypatch, drop, compiled_in):
    # training=self.training is read at each call (equivfx.trace.by_mode): like a dropout
    # module, the identity on the layout in eval mode, on the slots moved back and forth in
    # training (_same: bitwise the outputs without the pass in both modes, whichever compiled)
    x = torch.randn(3, 2, 6, 6)
    on = _same(monkeypatch, FunctionalDropout(drop).train(compiled_in == "train"), x)
    assert on.equivfx_info.modes_read == ("",)
    assert _flags(on) == {
        "c2": {"channels_out": True},
        "c3": {"channels_in": True},
        "fc1": {"channels_out": True},
        "fc2": {"channels_in": True},
    }
    assert _moves(on) == []
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


@pytest.mark.parametrize("drop", [F.dropout, F.dropout2d, torch.dropout])
def test_functional_dropout_drawing_masks_ends_the_layout(monkeypatch, drop):
    # masks are drawn in memory order: on the slots moved back, they are the masks it drew
    model = FunctionalDropout(drop, True)  # training=True written out: masks in either mode
    x = torch.randn(3, 2, 6, 6)
    on = _same(monkeypatch, model, x)
    assert _flags(on) == {"c2": {}, "c3": {}, "fc1": {}, "fc2": {}}
    assert _moves(on) == []


def test_functional_dropout_in_place_writes_its_input_as_without_the_pass(monkeypatch):
    # a review: F.dropout(h, p, self.training, inplace=True) used for its effect on h ran on a
    # copy moved back, leaving h whole in training; an in-place dropout ends the layout
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = (
                nn.Conv2d(2 if i == 0 else 4, 4, 3, padding=1) for i in range(3)
            )

        def forward(self, x):
            h = self.c2(F.relu(self.c1(x)))
            F.dropout(h, 0.5, self.training, inplace=True)
            return self.c3(F.relu(h)).mean((2, 3))

    x = torch.randn(3, 2, 6, 6)
    on = _same(monkeypatch, InPlace().eval(), x)  # bitwise as without the pass, in training too
    on.train()
    torch.manual_seed(0)
    trained = on(x)
    with torch.no_grad():
        assert not torch.allclose(trained, on.eval()(x))  # it dropped entries of h


class StridedDropout(nn.Module):
    """Dropout of values moved in from strided tensors: the output of a channels-last
    convolution (``conv=True``), or a transposed view of tokens."""

    def __init__(self, conv, drop):
        super().__init__()
        self.conv, self.drop = conv, drop
        if conv:
            self.c0, self.c1, self.c2 = (
                nn.Conv2d(2 if i == 0 else 4, 4, 3, padding=1) for i in range(3)
            )
        else:
            self.c0, self.c1 = nn.Linear(16, 8), nn.Linear(2, 8)
            self.c2, self.c3 = nn.Linear(2, 3), nn.Linear(8, 3)

    def forward(self, x):
        if self.conv:
            h = F.relu(self.c0(x))
            return (self.c1(self.drop(h)) + self.c2(h)).mean((1, 2, 3))
        u = self.c0(x.flatten(2)).transpose(1, 2)  # (|G| B, 8, 2): a view
        return self.c2(self.drop(u)).sum(1) + self.c3(self.c1(u).sum(1))


@pytest.mark.parametrize("drop", [nn.Dropout(0.5), nn.AlphaDropout(0.5)], ids=["drop", "alpha"])
@pytest.mark.parametrize("conv", [True, False], ids=["channels-last", "transposed"])
def test_dropout_of_a_value_moved_in_draws_the_masks_it_drew(monkeypatch, conv, drop):
    # dropout draws its mask in its input's memory order: a value moved in is a contiguous
    # copy of what was strided (0.03 to 0.28 off before), so such a dropout stays on the slots
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 6) if conv else torch.randn(3, 2, 4, 4)
    model = StridedDropout(conv, drop)
    kwargs = {} if conv else {"example_inputs": x}
    on, off = _with_pass(model, **kwargs), _without_pass(monkeypatch, model, **kwargs)
    off.load_state_dict(on.state_dict())
    if conv:
        x = x.to(memory_format=torch.channels_last)
        on, off = (m.to(memory_format=torch.channels_last) for m in (on, off))
    on.train(), off.train()
    with torch.no_grad():
        assert torch.equal(_seeded(on, x), _seeded(off, x))


class ConvStream(nn.Module):
    """A memory-order op (dropout, an RMS norm of the spatial axes) on a convolution's output
    that a fused layer also reads (it would move in)."""

    def __init__(self, op):
        super().__init__()
        self.c0, self.c1, self.c2 = (
            nn.Conv2d(2 if i == 0 else 4, 4, 3, padding=1) for i in range(3)
        )
        self.op = op

    def forward(self, x):
        h = F.relu(self.c0(x))
        return (self.c1(self.op(h)) + self.c2(h)).mean((1, 2, 3))


@pytest.mark.parametrize("op", [nn.Dropout(0.5), nn.RMSNorm((6, 6))], ids=["drop", "rms"])
def test_strides_at_compile_are_not_the_strides_at_every_call(monkeypatch, op):
    # compiled on contiguous example inputs, then converted to channels-last: the example's
    # strides said contiguous (dropout 0.0097 off when a convolution's output moved in by them)
    x = torch.randn(2, 2, 6, 6)
    model = ConvStream(op).eval()
    on, off = (
        _with_pass(model, example_inputs=x),
        _without_pass(monkeypatch, model, example_inputs=x),
    )
    off.load_state_dict(on.state_dict())
    on, off = (m.to(memory_format=torch.channels_last) for m in (on, off))
    x = x.to(memory_format=torch.channels_last)
    for mode in (False, True):
        on.train(mode), off.train(mode)
        with torch.no_grad():
            assert torch.equal(_seeded(on, x), _seeded(off, x))


class HeadDropout(Residual):
    """A residual stream, a mean over the spatial axes, dropout, the classifier."""

    def __init__(self, functional):
        super().__init__()
        self.functional, self.drop = functional, nn.Dropout(0.5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for conv in self.convs:
            x = x + F.relu(conv(x))
        h = x.mean((2, 3))
        return self.fc(F.dropout(h, 0.5, True) if self.functional else self.drop(h))


@pytest.mark.parametrize("functional", [False, True])
def test_a_dropout_after_a_mean_keeps_the_stream_in_the_layout(monkeypatch, functional):
    # a mean makes a new tensor in its own order: the dropout after it draws the same masks
    # (the stream stayed in folded slots for it, every block moving out and back in)
    x = torch.randn(2, 2, 6, 6)
    on = _same(monkeypatch, HeadDropout(functional).eval(), x, grads="close")
    assert _moves(on) == ["slots_to_channels", "channels_to_slots"]
    on, off = (
        _with_pass(HeadDropout(functional)),
        _without_pass(monkeypatch, HeadDropout(functional)),
    )
    off.load_state_dict(on.state_dict())
    on, off = (m.to(memory_format=torch.channels_last).train() for m in (on, off))
    with torch.no_grad():  # the same masks; the mean of a contiguous copy: its last bits
        x = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(_seeded(on, x), _seeded(off, x), rtol=1e-6, atol=1e-7)


class IndirectReader(StridedStream):
    """The strided stream read by a memory-order op through an op the pass does not keep, or
    by functional dropout drawing masks."""

    def __init__(self, reader):
        super().__init__(nn.Identity())
        self.reader = reader
        self.rms, self.drop = nn.RMSNorm(8), nn.Dropout(0.5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.fc1(self.n1(t))
        if self.reader == "rms(-t)":
            u = self.rms(-t)
        elif self.reader == "dropout(-t)":
            u = self.drop(-t)
        else:
            u = F.dropout(t, 0.5)  # training=True: draws masks in eval mode too
        t = t + self.fc2(u)
        return self.head(t).mean(1)


@pytest.mark.parametrize("reader", ["rms(-t)", "dropout(-t)", "F.dropout(t)"])
def test_memory_order_ops_behind_other_ops_see_the_strides_they_saw(monkeypatch, reader):
    # a copy moved back for -t is contiguous where the stream was a transposed view: the op
    # after it saw other strides (0.105 off for dropout's masks, 1.9e-9 for the RMS norm)
    x = torch.randn(3, 2, 8, 8)
    _same(monkeypatch, IndirectReader(reader).eval(), x, grads="close", example_inputs=x)


class PoolFeatures(nn.Module):
    """A pool over the last axis between linear layers: it would pool across the slots' blocks
    of the feature layout."""

    def __init__(self, tokens=True):
        super().__init__()
        self.tokens = tokens
        self.stem = nn.Linear(16 if tokens else 32, 6)
        self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.pool = nn.MaxPool1d(3, 1, 1)

    def forward(self, x):
        t = x.flatten(2) if self.tokens else x.flatten(1)
        h = F.avg_pool1d(self.l1(F.relu(self.stem(t))), 3, 1, 1)
        return self.l2(self.pool(h)).sum(-1)


@pytest.mark.parametrize("tokens", [True, False])
def test_pools_do_not_keep_a_layout_on_the_last_axis(monkeypatch, tokens):
    on = _same(monkeypatch, PoolFeatures(tokens).eval(), torch.randn(3, 2, 4, 4))
    assert _flags(on) == {"l1": {}, "l2": {}}
    with torch.no_grad():  # channel_call too: a pool put in place of a kept ReLU later
        on = _with_pass(Tokens(tokens).eval())
        off = _without_pass(monkeypatch, Tokens(tokens).eval())
        off.load_state_dict(on.state_dict())
        for m in (on, off):
            m.act = nn.MaxPool1d(3, 1, 1)
        x = torch.randn(3, 2, 4, 4)
        assert torch.equal(on(x), off(x))


class PoolsTheChannels(nn.Module):
    """A 2-D pool of a Conv1d's (B, C, L) output takes it as one unbatched image (C, B, L):
    it pools the channels too, across the slots' blocks of the channel layout."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.c1, self.c2, self.c3 = (
            nn.Conv1d(2 if i == 0 else 4, 4, 3, padding=1) for i in range(3)
        )
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.c2(F.relu(self.c1(x))))
        return self.c3(self.pool(h) if self.pool is not None else h).mean((1, 2))


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d((3, 1), 1, (1, 0)),
        functools.partial(F.avg_pool2d, kernel_size=(3, 1), stride=1, padding=(1, 0)),
        functools.partial(F.adaptive_max_pool2d, output_size=(4, 8)),
    ],
    ids=["MaxPool2d", "avg_pool2d", "adaptive_max_pool2d"],
)
def test_a_pool_of_more_axes_than_the_spatial_ones_ends_the_layout(monkeypatch, pool):
    x = torch.randn(3, 2, 8)
    on = _same(monkeypatch, PoolsTheChannels(pool).eval(), x, "ShiftRev4")
    assert _flags(on) == {"c2": {}, "c3": {}}
    assert equivfx.verify(on, x, rtol=1e-4, atol=1e-5).ok


def test_a_pool_put_in_after_compiling_pools_the_slots_it_pooled_before(monkeypatch):
    torch.manual_seed(0)
    model = PoolsTheChannels(None).eval()
    x = torch.randn(3, 2, 8)
    on, off = (
        _with_pass(model, "ShiftRev4"),
        _without_pass(monkeypatch, copy.deepcopy(model), "ShiftRev4"),
    )
    assert _flags(on) == {"c2": {"channels_out": True}, "c3": {"channels_in": True}}
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        for pool in (nn.MaxPool2d((3, 1), 1, (1, 0)), nn.MaxPool1d(3, 1, 1)):
            on.act = off.act = pool  # a 2-D pool on (B, |G| C, L): on folded slots
            assert torch.equal(on(x), off(x))


class ConvThenLinear(Convs):
    """A linear layer over the last spatial axis of a fused convolution's output."""

    def __init__(self):
        super().__init__("c1", "c2", c=4)
        self.lin1, self.lin2 = nn.Linear(6, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = torch.relu(self.c2(F.relu(self.c1(x))))
        return self.lin2(torch.relu(self.lin1(y))).mean((1, 2, 3))


def test_a_convolution_hands_its_layout_to_no_linear_layer(monkeypatch):
    on = _same(monkeypatch, ConvThenLinear().eval(), torch.randn(2, 2, 6, 6))
    # c2's channel layout is not lin1's feature layout: it moves back; the linear layers keep
    # theirs between them
    assert _flags(on) == {
        "c2": {},
        "lin1": {"channels_out": True},
        "lin2": {"channels_in": True},
    }
    assert _reps(on)["relu_2"] == ChannelFolded(4, -1) and _reps(on)["relu_1"] != ChannelFolded(4)


def test_linear_layers_and_modules_hooked_after_compiling_see_folded_slots(monkeypatch):
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(2, 2, 4, 4)
    # (from copies: compiled models call the model's own activation modules)
    on, off = _with_pass(model), _without_pass(monkeypatch, copy.deepcopy(model))
    seen = {"on": [], "off": []}
    for name, m in (("on", on), ("off", off)):
        for module in (m.l2, m.act):
            module.register_forward_pre_hook(
                lambda mod, i, k=name: seen[k].append(tuple(i[0].shape))
            )
            module.register_forward_hook(lambda mod, i, o: o * torch.arange(1.0, 1 + o.shape[-1]))
    with torch.no_grad():
        assert torch.equal(on(x), off(x))
    assert seen["on"] == seen["off"] == [(8, 2, 6), (8, 2, 6)]


def test_the_verifier_locates_a_broken_op_among_linear_layers():
    x = torch.randn(2, 2, 4, 4)
    on = _with_pass(Tokens().eval())
    node = next(n for n in on.graph.nodes if n.name == "tanh")
    assert node.meta[REP] == ChannelFolded(4, -1)
    node.target = _tanh_then_weigh
    on.recompile()
    report = equivfx.verify(on, x, rtol=1e-4, atol=1e-5)
    assert not report.ok and report.first_bad_node == "tanh"


def _tanh_then_weigh(t):
    return torch.tanh(t) * torch.arange(t.shape[-1], dtype=t.dtype)


# ------------------------------------------------------------------ drawn networks
OPS = (
    "relu", "relu_", "maxpool", "avgpool", "scale", "residual", "iadd", "bn", "gelu", "conv",
    "dropout", "layernorm",
)  # fmt: skip
# (each "bn" has its own module: the pass moves a batch norm into the channel layout)


def _drawn_op(op, x, y, bn, drop, norm, pools):
    """The drawn networks' op ``op`` after a layer: on its output ``y`` (and its input ``x``,
    for the sums), with the network's own batch norm, dropout, norm and pool functions."""
    if op == "relu":
        return torch.relu(y)
    if op == "relu_":
        return y.relu_()
    if op == "maxpool":
        return pools[0](y, 3, 1, 1)
    if op == "avgpool":
        return pools[1](y, 3, 1, 1)
    if op == "scale":
        return 0.5 * y - 1.0
    if op == "residual":
        return operator.add(x, F.silu(y))
    if op == "iadd":
        y += x
        return y
    if op == "bn":
        return bn(y)
    if op == "gelu":
        return F.gelu(y)
    if op == "dropout":
        return drop(y)
    if op == "layernorm":
        return norm(y)
    return y


class Drawn(nn.Module):
    def __init__(self, ops, c=3):
        super().__init__()
        self.ops = ops
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in ops)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in ops)
        self.drop = nn.Dropout2d(0.3)
        self.norm = nn.LayerNorm((8, 8))  # the spatial axes: rows within one channel

    def forward(self, x):
        x = self.stem(x)
        pools = (F.max_pool2d, nn.functional.avg_pool2d)
        for op, conv, bn in zip(self.ops, self.convs, self.bns, strict=True):
            x = _drawn_op(op, x, conv(x), bn, self.drop, self.norm, pools)
        return x.mean((2, 3))


@given(
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
    spec=st.sampled_from(["C4", "D4"]),
)
def test_drawn_networks_give_the_outputs_of_the_fused_layout(ops, spec):
    # a fresh monkeypatch per example (the function-scoped fixture is shared by examples)
    with pytest.MonkeyPatch.context() as monkeypatch:
        torch.manual_seed(0)
        model = Drawn(ops).eval()
        x = torch.randn(2, 2, 8, 8)
        on = _same(monkeypatch, model, x, spec)
        assert sum(n.meta.get("equivfx.mixing", False) for n in on.graph.nodes) == len(ops)


class DrawnLinear(nn.Module):
    """Linear layers on (B, 32) or on the last axis of (B, 2, 16) tokens, with drawn ops
    between them (a pool over the last axis; a batch norm on features, or on tokens). Eight
    features: the values' sizes are multiples of 64 (see ``test_a_partial_vector_rounds_...``)."""

    def __init__(self, ops, tokens, f=8):
        super().__init__()
        self.ops, self.tokens = ops, tokens
        self.stem = nn.Linear(16 if tokens else 32, f)
        self.lins = nn.ModuleList(nn.Linear(f, f) for _ in ops)
        self.bns = nn.ModuleList(nn.BatchNorm1d(2 if tokens else f) for _ in ops)
        self.drop = nn.Dropout(0.3)
        self.norm = nn.LayerNorm(f)  # the features of each slot

    def forward(self, x):
        x = self.stem(x.flatten(2) if self.tokens else x.flatten(1))
        pools = (F.max_pool1d, nn.functional.avg_pool1d)  # over the last axis
        for op, lin, bn in zip(self.ops, self.lins, self.bns, strict=True):
            x = _drawn_op(op, x, lin(x), bn, self.drop, self.norm, pools)
        return x.mean(1) if self.tokens else x


@settings(deadline=None)  # compiling takes 30 to 300 ms; examples come from the conftest profile
@given(
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
    spec=st.sampled_from(["C4", "D4"]),
    tokens=st.booleans(),
    shapes=st.booleans(),
)
def test_drawn_linear_networks_give_the_outputs_of_the_fused_layout(ops, spec, tokens, shapes):
    with pytest.MonkeyPatch.context() as monkeypatch:
        torch.manual_seed(0)
        model = DrawnLinear(ops, tokens).eval()
        x = torch.randn(2, 2, 4, 4)
        kwargs = {"example_inputs": x} if shapes else {}
        _same(monkeypatch, model, x, spec, **kwargs)


@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_a_partial_vector_rounds_sigmoids_apart_by_a_bit(monkeypatch, spec):
    # PyTorch's CPU kernels for sigmoid and SiLU compute the last partial vector of a tensor
    # with other code: where the two layouts put an element there in one and not the other, its
    # value may differ in the last bit (here 2 x 2 x |G| x 3 elements). Outputs are then equal to
    # rounding, gradients too.
    torch.manual_seed(0)
    model = DrawnLinear(["residual", "relu", "relu"], tokens=True, f=3).eval()
    x = torch.randn(2, 2, 4, 4)
    on, off = _with_pass(model, spec), _without_pass(monkeypatch, model, spec)
    outs = []
    for m in (on, off):
        out = m(x)
        out.square().sum().backward()
        outs.append([out, *(p.grad for p in m.parameters())])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
