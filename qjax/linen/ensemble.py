"""PIPE's ensemble: a residual-expanded model split into members that run in
parallel, one member per group of devices.

`split_params(qtree, groups)` gives M member parameter trees: member m holds
the orders groups[m] of every expanded kernel (qjax.transforms.residual), and
every other parameter. A split layer's bias belongs to member 0 only (the
others hold zeros), so it is counted once.

`apply` runs the members under `jax.shard_map` on a mesh axis of M devices
(the remaining devices split the batch) and combines them:
  combine='layer'   the members' partial outputs of every split layer are
                    summed (`psum`) before anything non-linear sees them: one
                    all-reduce per layer, and the result equals the expanded
                    model's output up to float summation order.
  combine='output'  each member runs the whole model alone and the outputs
                    are summed once at the end: no communication until then,
                    but sigma(a + b) != sigma(a) + sigma(b), so this is an
                    approximation. Our notes could not read how PIPE builds
                    and combines its members; this is our reading of "an
                    ensemble summed at the end", measured in the README.
Members run on dequantized float weights (the reference path); packed
kernels are qjax.kernels' job.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qjax import api, intercept, qtensor
from qjax.transforms import residual

COMBINE = ("layer", "output")


def _is_expansion(x) -> bool:
  return isinstance(x, residual.Expansion)


def split_modules(qtree) -> frozenset[tuple[str, ...]]:
  """Module paths (e.g. ('layer_0', 'query')) whose kernel is a residual
  expansion, for a params tree or a {'params': ...} variables tree."""
  out = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(
    qtree, is_leaf=qtensor.is_quantized
  ):
    if _is_expansion(leaf):
      keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
      keys = keys[:-1]  # the module holding 'kernel'
      if keys and keys[0] == "params":  # a {'params': ...} variables tree
        keys = keys[1:]
      out.add(tuple(keys))
  return frozenset(out)


def split_params(qtree, groups) -> list:
  """M member trees from a tree with Expansion leaves.

  Args:
    qtree: a quantized tree ({'params': ...}) whose split layers hold
      Expansion kernels of one order K.
    groups: a partition of range(K) into M members (zero-based orders),
      e.g. ((0,), (1,), (2, 3)).

  Returns:
    M trees of the same structure: Expansion kernels hold their member's
    orders; biases of split layers are zero outside member 0.
  """
  orders = {
    e.order
    for e in jax.tree.leaves(qtree, is_leaf=_is_expansion)
    if _is_expansion(e)
  }
  if len(orders) != 1:
    raise ValueError(f"the tree's expansions have orders {sorted(orders)}")
  members = []
  for m in range(len(groups)):

    def member_of(path, leaf, m=m):
      if _is_expansion(leaf):
        return residual.split(leaf, groups)[m]
      name = getattr(path[-1], "key", None)
      parent = path[:-1]
      if m and name == "bias" and _sibling_is_split(qtree, parent):
        return jnp.zeros_like(leaf)
      return leaf

    members.append(
      jax.tree_util.tree_map_with_path(member_of, qtree, is_leaf=_is_expansion)
    )
  return members


def _sibling_is_split(tree, parent_path) -> bool:
  node = tree
  for k in parent_path:
    node = node[k.key]
  return _is_expansion(node.get("kernel"))


class Stacked(NamedTuple):
  """Member parameters for `apply`, in float32.

  varying: the leaves that differ between members, stacked [M, ...] (None
    where a leaf is shared); shared: the leaves every member holds as the
    same array (None where they vary). Shared leaves stay replicated, so
    what the members compute from them alone is known to be equal.
  """

  varying: Any
  shared: Any


def stack(members) -> Stacked:
  """Dequantizes M member trees (`split_params`) for `apply`."""
  dense = [api.dequantize(t, jnp.float32) for t in members]
  flat = [jax.tree.flatten(t) for t in dense]
  treedef = flat[0][1]
  varying, shared = [], []
  for leaves in zip(*(f[0] for f in flat), strict=True):
    same = all(x is leaves[0] for x in leaves)
    varying.append(None if same else jnp.stack(leaves))
    shared.append(leaves[0] if same else None)
  return Stacked(
    jax.tree.unflatten(treedef, varying), jax.tree.unflatten(treedef, shared)
  )


def _merge(varying, shared):
  return jax.tree.map(
    lambda v, s: s if v is None else v[0],
    varying,
    shared,
    is_leaf=lambda x: x is None,
  )


def member_mesh(n_members: int, devices=None) -> jax.sharding.Mesh:
  """A ('member', 'data') mesh: n_members x (devices / n_members)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if devices.size % n_members:
    raise ValueError(
      f"{n_members} members do not divide {devices.size} devices"
    )
  grid = devices.reshape(n_members, devices.size // n_members)
  return jax.sharding.Mesh(grid, ("member", "data"))


def _psum_handler(axis):
  def psum(module, next_fun, args, kwargs):
    return jax.lax.psum(next_fun(*args, **kwargs), axis)

  return psum


def apply(
  fn,
  stacked,
  *inputs,
  mesh: jax.sharding.Mesh,
  modules=frozenset(),
  combine: str = "layer",
  member_axis: str = "member",
  data_axis: str = "data",
):
  """Runs M members in parallel and combines them.

  Args:
    fn: fn(params, *inputs) -> array, a Flax apply (e.g. model.apply).
    stacked: the members' parameters (`stack`); M = mesh.shape[member_axis].
    *inputs: arrays whose leading axis is the batch; split over data_axis
      (padded to a multiple of its size, and the padding cut off again).
    mesh: a mesh with member_axis and data_axis (`member_mesh`).
    modules: `split_modules(qtree)`: the layers whose members are summed.
    combine: 'layer' (exact) or 'output' (ensemble approximation).

  Returns:
    fn's output for the whole batch, combined over members.
  """
  if combine not in COMBINE:
    raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
  m = mesh.shape[member_axis]
  sizes = {x.shape[0] for x in jax.tree.leaves(stacked.varying)}
  if sizes - {m}:
    raise ValueError(f"stacked leading sizes {sorted(sizes)} != {m} members")
  batch = inputs[0].shape[0]
  pad = -batch % mesh.shape[data_axis]
  if pad:  # repeat the last row: any input stays valid (masks, ids)
    inputs = tuple(
      jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) for x in inputs
    )
  modules = frozenset(modules)
  handler = _psum_handler(member_axis)

  def member(varying, shared, *xs):
    params = _merge(varying, shared)
    if combine == "output":
      return jax.lax.psum(fn(params, *xs), member_axis)
    with intercept.calls(handler, lambda m: m.path in modules):
      return fn(params, *xs)

  run = jax.shard_map(
    member,
    mesh=mesh,
    in_specs=(P(member_axis), P(), *[P(data_axis)] * len(inputs)),
    out_specs=P(data_axis),
  )
  return jax.jit(run)(stacked.varying, stacked.shared, *inputs)[:batch]


def apply_sequential(fn, members, *inputs, combine: str = "layer"):
  """The single-device result `apply` must equal.

  'layer': fn on the summed weights (the expanded model itself; leaves all
  members share are taken once); 'output': the sum over members of fn on
  each member's weights.
  """
  if combine not in COMBINE:
    raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
  if combine == "layer":
    varying, shared = stack(members)
    summed = jax.tree.map(
      lambda v, s: s if v is None else jnp.sum(v, axis=0),
      varying,
      shared,
      is_leaf=lambda x: x is None,
    )
    return fn(summed, *inputs)
  dense = [api.dequantize(t, jnp.float32) for t in members]
  return sum(fn(p, *inputs) for p in dense)
