"""The house: packages in layers, no upward import, no cycle.

Every import counts, at module level or inside a function: a function-level
import is a dependency that only shows up later.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("input_pipeline", "nearid_jax", "configs")

# Bottom to top. A module may import its own layer (without a cycle) and the
# layers below it, never one above.
LAYERS = [
    ("data", ("input_pipeline",)),
    ("math", ("nearid_jax.vit", "nearid_jax.losses", "nearid_jax.metrics",
              "nearid_jax.retrieval", "nearid_jax.sharding",
              "nearid_jax.optim", "nearid_jax.checkpointing",
              "nearid_jax.workdir", "nearid_jax.formats", "nearid_jax.cpu",
              "nearid_jax.kernels", "nearid_jax.signals")),
    ("model", ("nearid_jax.model", "nearid_jax")),
    ("evaluators", ("nearid_jax.evaluators",)),
    ("training", ("nearid_jax.training",)),
    ("demo", ("nearid_jax.demo",)),
    ("launch", ("nearid_jax.tasks", "nearid_jax.sweep", "nearid_jax.score")),
    ("configs", ("configs",)),
]


def modules(root=ROOT):
  """{module name: file} of the packages."""
  out = {}
  for pkg in PACKAGES:
    for d, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(d, f)
          name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[name.removesuffix(".__init__")] = path
  return out


def imports(path, known):
  """The known modules a file imports, anywhere in it."""
  def resolve(name):
    while name and name not in known:
      name = name.rpartition(".")[0]
    return name or None

  deps = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      deps |= {resolve(a.name) for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, f"{path}: relative import"
      deps |= {resolve(f"{node.module}.{a.name}") or resolve(node.module)
               for a in node.names}
  return deps - {None}


def graph(root=ROOT):
  known = modules(root)
  return {m: imports(p, known) - {m} for m, p in known.items()}


def layer(module):
  """Index in LAYERS of the longest prefix that names the module."""
  best = None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if module == p or module.startswith(p + "."):
        if best is None or len(p) > best[1]:
          best = (i, len(p))
  assert best is not None, f"{module} is in no layer: add it to LAYERS"
  return best[0]


def cycles(g):
  """Strongly connected components with more than one module."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in g[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on.discard(w)
        comp.add(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def upward(g):
  return sorted(f"{m} ({LAYERS[layer(m)][0]}) -> {d} ({LAYERS[layer(d)][0]})"
                for m, deps in g.items() for d in deps
                if layer(d) > layer(m))


@pytest.fixture(scope="module")
def house():
  return graph()


def test_no_import_cycle(house):
  assert cycles(house) == []


def test_no_upward_import(house):
  assert upward(house) == []


def test_input_pipeline_never_imports_nearid_jax(house):
  bad = [f"{m} -> {d}" for m, deps in house.items()
         if m.startswith("input_pipeline") for d in deps
         if d.startswith("nearid_jax")]
  assert bad == []


def test_model_code_is_backend_free(house):
  # vit.py is the plain math: backend fast paths are chosen above it.
  assert not {d for d in house["nearid_jax.vit"] if d.startswith("nearid_jax")}


def test_the_checker_finds_what_it_looks_for():
  g = {"input_pipeline.a": {"nearid_jax.model"},
       "nearid_jax.model": {"nearid_jax.training.train"},
       "nearid_jax.training.train": {"nearid_jax.model"},
       "nearid_jax.vit": set()}
  assert cycles(g) == [["nearid_jax.model", "nearid_jax.training.train"]]
  assert upward(g) == [
      "input_pipeline.a (data) -> nearid_jax.model (model)",
      "nearid_jax.model (model) -> nearid_jax.training.train (training)"]


def test_function_level_imports_count(tmp_path):
  pkg = tmp_path / "nearid_jax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "model.py").write_text("def f():\n  from nearid_jax import tasks\n")
  (pkg / "tasks.py").write_text("import nearid_jax.model\n")
  g = graph(str(tmp_path))
  assert g["nearid_jax.model"] == {"nearid_jax.tasks"}
  assert cycles(g) == [["nearid_jax.model", "nearid_jax.tasks"]]
