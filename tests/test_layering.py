"""The package's import graph runs one way down the flow, with no circle, and its docs name real files.

The graph is read from the source (every `import` / `from ... import` of a psynth_jax module in
every file, those inside functions and `if TYPE_CHECKING:` blocks included: an import that runs
late still ties the two modules together). Each module belongs to the longest entry of `LAYERS`
that prefixes its name; it may import modules of its own entry or of an entry listed before
it, never one listed after (an upward import). Inside an entry, the modules must not import one
another in a circle. docs/ARCHITECTURE.md draws the same order.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "psynth_jax"

# Bottom first: what every stage uses, then the stages of the flow
# (text -> branches -> caches -> mapper -> synthesizer -> answer), then their consumers.
LAYERS = (
    "psynth_jax.formats",  # data rows, the \boxed{} convention, JSON / UTF-8 readers
    "psynth_jax.config",  # typed YAML configs
    "psynth_jax.distributed",  # many processes, one program
    "psynth_jax.checkpoints",  # a run's Orbax checkpoints (written by train, read by interop)
    "psynth_jax.model",  # config, presets, RoPE, sharding rules, the KV cache and every branch-cache type
    "psynth_jax.model.kernels",  # attention: one dispatcher, one file per kernel
    "psynth_jax.model.transformer",  # the NNX decoder
    "psynth_jax.model.loaded",  # LoadedModel, the type every stage passes around
    "psynth_jax.inference",  # jitted prefill / extend / decode, sampling, Generator
    "psynth_jax.synthesis",  # handoff convention, branches, mapper, the core, ParallelSynthesis
    "psynth_jax.serve",  # the serving engine (prefill / insert / generate), branch store, scheduler, HTTP API
    "psynth_jax.interop",  # checkpoints in and out (HF, GGUF, PEFT, the release)
    "psynth_jax.measure",  # timing, TTFT, roofline cost model, profiles
    "psynth_jax.eval",  # tasks, scorers, the eval runner
    "psynth_jax.data",  # training examples (distillation reads evaluation tasks' rows)
    "psynth_jax.train",  # objective, step, trainer, memory plan
    "psynth_jax.cli",  # the `psynth` command
)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """Every psynth_jax module `path` imports, anywhere in the file (relative imports resolved)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from psynth_jax.x import y` imports psynth_jax.x.y when y is a module
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in package_modules() and m != own}


@functools.cache
def package_modules() -> frozenset[str]:
    """Every module of the package but its root (an empty namespace)."""
    return frozenset({module_name(p) for p in PACKAGE.rglob("*.py")} - {"psynth_jax"})


def layer_of(module: str) -> int:
    hits = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    assert hits, f"{module} is in no layer: add its package to LAYERS (and to docs/ARCHITECTURE.md)"
    return max(hits, key=lambda i: len(LAYERS[i]))


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) != "psynth_jax"}


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_runs_up_the_flow():
    upward = [f"{m} ({LAYERS[layer_of(m)]}) -> {t} ({LAYERS[layer_of(t)]})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_circle_inside_a_layer():
    graph = import_graph()
    same = {m: {t for t in ts if layer_of(t) == layer_of(m)} for m, ts in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(same[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [m, t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(same):
        if m not in state:
            visit(m, [])
    assert circles == []


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
# where a path a document names may be rooted: the repository, the package, the model (kernels/...)
ROOTS = (ROOT, PACKAGE, PACKAGE / "model")
NOT_OURS = ("parallel_synthesis/",)  # the reference release's repository, which docs/METHOD.md cites


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_the_docs_name_exists(doc):
    """Every code path a document names (`psynth_jax/...`, `benchmarks/...`, `tests/...`,
    `launch/...`, and any `dir/module.py` of the package, e.g. `synthesis/core.py`) is in the
    repository: a doc citing a moved or removed module fails here. Result folders a command
    writes (benchmarks/results/...) are outputs, not code, and are not checked."""
    text = doc.read_text()
    named = set(re.findall(r"(?<![\w/.])((?:psynth_jax|benchmarks|tests|launch)/[\w./{},-]*[\w/}])", text))
    named |= set(re.findall(r"(?<![\w/.-])((?:[a-z_]+/)+[a-z_]+\.py)\b", text))
    missing = [path for name in sorted(named) if not name.startswith(NOT_OURS)
               for path in _expand(name) if not _exists(path)]
    assert missing == []


def _exists(path: str) -> bool:
    """A file or folder under one of ROOTS, or (a `{a,b}[_x].yaml` family) the start of one's name."""
    if path.startswith("benchmarks/results/"):
        return True
    return any((root / path).exists() or any((root / path).parent.glob(Path(path).name + "*")) for root in ROOTS)


def _expand(name: str) -> list[str]:
    """`a/{b,c}.py` -> [a/b.py, a/c.py]; other names as they are."""
    match = re.search(r"\{([^}]*)\}", name)
    if not match:
        return [name]
    return [p for alt in match.group(1).split(",") for p in _expand(name[: match.start()] + alt + name[match.end():])]
