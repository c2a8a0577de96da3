"""No module imports from a layer above its own (the architecture in the README).

Layers, bottom to top: primitives, transports, roles, algorithms, entry points.  A
module may import from its own layer and the ones below; so a role never imports an
algorithm, and the parameter server never imports a role.  Imports inside functions
count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mpibelief"

LAYERS = {  # module prefix -> layer; the longest matching prefix wins
    "mpibelief": 0,  # primitives: config, layout, clock, kernels, model, optim, data, ...
    "mpibelief.comm": 1,  # transports
    "mpibelief.compressed_exchange": 1,
    "mpibelief.ps": 1,
    "mpibelief.partition": 1,
    "mpibelief.worker": 2,  # roles
    "mpibelief.coordinator": 2,
    "mpibelief.portion_worker": 2,
    "mpibelief.algorithms": 3,
    "mpibelief.train": 4,  # entry points and what only they use
    "mpibelief.__main__": 4,
    "mpibelief.guard": 4,
    "mpibelief.janitor": 4,
    "mpibelief.plots": 4,
    "mpibelief.simulate": 4,
    "mpibelief.simulate.sync": 4,  # sync/Strom/SGD[1] on a virtual clock (uses algorithms)
    "mpibelief.simulate.collectives": 4,
    "mpibelief.simulate.exchange_work": 4,
    "mpibelief.simulate.sandblaster": 4,  # the simulated Sandblaster: entry and cluster
    "mpibelief.simulate.sandblaster_cluster": 4,
    "mpibelief.simulate.links": 4,  # shard links, shared by both simulated clusters
}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("mpibelief")}


def test_no_module_imports_from_a_layer_above():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for other in imported(path):
            if layer(other) > layer(me):
                wrong.append(f"{me} (layer {layer(me)}) imports {other} (layer {layer(other)})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a role importing an algorithm is caught."""
    path = PACKAGE / "worker.py"
    assert layer("mpibelief.algorithms.sgd") > layer(module_name(path))
    assert "mpibelief.data.batches" in imported(path)  # from-imports are seen by name
