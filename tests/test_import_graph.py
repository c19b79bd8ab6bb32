"""The project's import graph has no circle (function-level imports count), and
the entry scripts import only the installed package."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dograph_jax",)
# Entry scripts and benchmarks: run as files, they import only `dograph_jax`.
SCRIPT_DIRS = ("experiments", "benchmarks")


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
  """Project modules that ``path`` imports, anywhere in the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import mod` imports pkg.mod when that is a module
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    out.update(n for n in names if n in modules)
  return out


def _graph() -> dict[str, set[str]]:
  files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
  modules = {_module_name(p): p for p in files}
  graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
  # A package's __init__ is imported by each of its submodules' imports:
  # an edge to `a.b` also runs `a`; leave those out (they are how packages work).
  return {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_cycle_finder_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
  graph = _graph()
  assert "dograph_jax.train.single_run" in graph["dograph_jax.train.offline"]
  assert "dograph_jax.train.offline" in graph["dograph_jax.train.pretrain"]
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_scripts_import_only_the_package():
  """No script imports another script or edits ``sys.path``: everything a
  script needs is in the installed package."""
  scripts = [p for d in SCRIPT_DIRS for p in (ROOT / d).rglob("*.py")]
  assert len(scripts) >= 8
  local = {p.stem for p in scripts} | {"experiments", "benchmarks"}
  for path in scripts:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        roots = [a.name.split(".")[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        assert node.level == 0, f"{path}: relative import"
        roots = [node.module.split(".")[0]]
      else:
        continue
      assert not set(roots) & local, f"{path} imports {roots}: scripts import only dograph_jax"
    assert "sys.path" not in path.read_text(), f"{path} edits sys.path"


def test_the_transform_needs_no_trainer_dependency():
  """``import dograph_jax`` (and its models) loads none of the ``train``
  extra's packages: a user of the transform alone installs only the core."""
  import subprocess
  import sys
  extra = ("tyro", "grain", "tokenizers", "sklearn", "transformers", "tensorboardX",
           "matplotlib", "lm_eval", "wandb")
  code = ("import sys, dograph_jax, dograph_jax.models; "
          f"print([m for m in {extra!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, check=True).stdout.strip()
  assert out == "[]", f"import dograph_jax loaded {out}"
