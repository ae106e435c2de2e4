"""Peak tensor memory of a forward pass: folding every slot against chunk=k, the layer-wise model
(both layouts), the base model at B and |G| B, and the hand-written loop over g.

torch keeps no CPU allocator statistics and a process's peak resident set size is set by importing
torch, so this script counts tensor storages itself: a ``TorchDispatchMode`` sees every op, adds the
bytes of each storage an op allocates, and subtracts them when the last tensor holding that storage
is garbage-collected (views share their base's storage and are counted once). The peak of the live
total during ``model(x)`` is the forward's peak activation memory (parameters, which exist before,
are not counted). The layer-wise gather layout keeps its largest gathered input in a per-thread
buffer between calls (``equivfx.passes.mixing.release_workspace``): its peak is measured at a
first call (the buffer counted), and the buffer held afterwards is reported too.

Run: ``python benchmarks/bench_memory.py [--quick] [--json PATH]``
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import MODELS  # noqa: E402

import equivfx  # noqa: E402
from equivfx.passes.mixing import release_workspace  # noqa: E402


class PeakTensorMemory(TorchDispatchMode):
    """Live and peak bytes of the storages allocated by ops run under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.holders: dict[int, list] = {}  # storage pointer -> [bytes, number of live tensors]

    def _release(self, ptr: int) -> None:
        entry = self.holders.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.holders[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in self.holders:  # another tensor on a storage we count (a view)
                self.holders[ptr][1] += 1
            elif ptr not in inputs and st.nbytes() > 0:  # a new allocation
                self.holders[ptr] = [st.nbytes(), 1]
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            else:
                continue
            weakref.finalize(t, self._release, ptr)
        return out


def peak_mib(fn) -> float:
    gc.collect()
    with torch.no_grad(), PeakTensorMemory() as mode:
        out = fn()
        del out
    return mode.peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    configs = [("resnet", "C4", 64), ("resnet", "D4", 64), ("vit", "D4", 64)]
    for name, label, batch in configs[:1] if args.quick else configs:
        factory, shape, specs = MODELS[name]
        torch.manual_seed(0)
        model = factory().eval()
        G = equivfx.group(specs[label])
        x = torch.randn(batch, *shape)
        row = {
            "model": name,
            "group": G.spec,
            "batch": batch,
            "base@B": peak_mib(lambda m=model, x=x: m(x)),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for chunk in (None, 4, 2, 1):
                em = equivfx.compile(model, G, example_inputs=x[:2], chunk=chunk)
                row[f"chunk={chunk}"] = peak_mib(lambda em=em, x=x: em(x))
            for label_, layout in (("layerwise", "gather"), ("layerwise-fused", "fused")):
                lw = equivfx.compile(
                    model, G, mode="layerwise", mix_layout=layout, example_inputs=x[:2]
                )
                release_workspace()  # the first call at this size allocates the gather buffer
                row[label_] = peak_mib(lambda lw=lw, x=x: lw(x))
                # kept after the call by gather-layout mixing convolutions (no autograd, CPU)
                row[f"{label_} buffer held"] = release_workspace() / 2**20
        xs = [G.act(G.inverse(g), x) for g in G.elements]
        xg = torch.cat(xs)
        row["base@GB"] = peak_mib(lambda m=model, xg=xg: m(xg))

        def loop(model=model, G=G, x=x):  # the hand-written loop: each slot's output kept
            return torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements]).mean(0)

        row["loop"] = peak_mib(loop)
        rows.append(row)
        print(
            f"{name} {G.spec} B={batch}: "
            + ", ".join(f"{k} {v:.1f} MiB" for k, v in row.items() if isinstance(v, float)),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
