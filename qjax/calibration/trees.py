"""Nested-dict helpers for the calibration drivers: a block lives at a
'/'-joined path of the parameter tree ('layer_3', or 'layers/3' in an NNX
state)."""

import jax

from qjax.paths import path_str


def keys(path: str) -> list[str]:
  return [k for k in path.split("/") if k]


def _key(tree, k):
  if k in tree:
    return k
  if k.isdigit() and int(k) in tree:  # NNX list indices are ints
    return int(k)
  raise KeyError(k)


def get(tree, path: str):
  for k in keys(path):
    tree = tree[_key(tree, k)]
  return tree


def has(tree, path: str) -> bool:
  try:
    get(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def replace(tree, path: str, value):
  """A copy of nested mapping `tree` with `path` set to value (only the
  dicts along the path are copied)."""
  head, *rest = keys(path)
  out = dict(tree)
  k = _key(tree, head) if head in tree or head.isdigit() else head
  out[k] = value if not rest else replace(tree[k], "/".join(rest), value)
  return out


def nest(path: str, value):
  """{'layers': {'3': value}} for 'layers/3'."""
  for k in reversed(keys(path)):
    value = {k: value}
  return value


def leaf_paths(tree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
