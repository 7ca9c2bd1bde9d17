"""Blocks found in any Linen or NNX model, so calibrated methods need no
hand-written BlockModel.

`discover(model, params, batches)` runs the float model once on the first
batch and watches its calls (qjax.intercept):

  blocks   the top-level submodules (and each element of a top-level NNX
           list) that call at least one linear layer (qjax.linear_layers),
           in call order, or the module paths given as `blocks=`. A
           top-level linear layer (a classifier) is a block of its own;
           submodules without one (an embedding, a final norm) are glue.
  chains   block i's call is a chain when its input is the very array block
           i-1 returned and its other arguments are those of the last block
           that was not a chain (positions, masks): then block i's calls are
           built from block i-1's outputs. Otherwise (pooling or any other
           glue between the two) the model is re-run up to block i on the
           stream's parameters and stopped there.

The walk it returns runs each block by itself (a clone of the Linen
submodule with its slice of every collection; the NNX submodule merged with
the stream's parameters), so GPTQ's sequential mode and the two-stream
driver hold one block's activations, as with a BlockModel.

Limits: a block called more than once, or inside a Flax transform
(nn.scan, nn.remat), cannot be cut out; name the blocks with `blocks=` or
write a BlockModel.
"""

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from qjax import intercept, linear_layers
from qjax.calibration import capture, trees
from qjax.calibration.blocks import hook_for, under_hook


class _Stop(Exception):
  """Raised at the block whose call a re-run is after."""

  def __init__(self, args, kwargs):
    super().__init__("stopped at the block")
    self.call = (tuple(args), dict(kwargs))


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _is_array(v) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


def _template(args, kwargs, prev_out, anchor):
  """How block i's call follows from block i-1's output and the anchor's
  call: a tuple of ('out',) / ('anchor', where) / ('const', value) per
  argument and kwarg, or None when it does not (a break)."""
  if anchor is None or not args or args[0] is not prev_out:
    return None
  a_args, a_kwargs = anchor
  where = {}
  for j, v in enumerate(a_args[1:], 1):
    where.setdefault(id(v), ("arg", j))
  for k, v in a_kwargs.items():
    where.setdefault(id(v), ("kw", k))

  def one(v):
    if _is_array(v):
      w = where.get(id(v))
      return None if w is None else ("anchor", w)
    return ("const", v)

  rest = [one(v) for v in args[1:]]
  kws = {k: one(v) for k, v in kwargs.items()}
  if any(r is None for r in rest) or any(r is None for r in kws.values()):
    return None
  return (tuple(rest), kws)


def _fill(template, out, anchor_call):
  rest, kws = template
  a_args, a_kwargs = anchor_call

  def value(t):
    if t[0] == "const":
      return t[1]
    kind, key = t[1]
    return a_args[key] if kind == "arg" else a_kwargs[key]

  return (
    (out, *(value(t) for t in rest)),
    {k: value(t) for k, t in kws.items()},
  )


class _Walk:
  """What the Linen and NNX walks share: the chain/re-run logic."""

  needs_tree = True
  applies_input_hook = True  # qjax.calibration.blocks

  def _init_blocks(self, records):
    self.records = records
    self.names = tuple(r["name"] for r in records)
    if not self.names:
      raise ValueError(
        "found no block with a linear layer (Dense, DenseGeneral, Einsum, "
        "Conv, or their NNX forms) in the model; pass blocks=[module "
        "paths] or a qjax.calibration.BlockModel"
      )
    self._extras = {}

  @staticmethod
  def _recorder(records, candidate, keep):
    """(handler, select) that append each block's record while the float
    model runs: name, the module to run it by, its chain template and its
    anchor (the last block that was not a chain)."""
    layers = []
    state = {"prev": None, "anchor": None, "anchor_index": None}

    def handler(module, next_fun, args, kwargs):
      path = intercept.path(module)
      before = len(layers)
      if linear_layers.is_linear(module):
        layers.append(path)
      if not candidate(module):
        return next_fun(*args, **kwargs)
      template = _template(args, kwargs, state["prev"], state["anchor"])
      out = next_fun(*args, **kwargs)
      if not any(
        p == path or p.startswith(path + "/") for p in layers[before:]
      ):
        return out  # glue: no linear layer inside
      if any(r["name"] == path for r in records):
        raise ValueError(
          f"block {path!r} is called more than once; pass blocks= or a "
          "qjax.calibration.BlockModel"
        )
      if template is None:
        state["anchor"] = (tuple(args), dict(kwargs))
        state["anchor_index"] = len(records)
      records.append(
        {
          "name": path,
          "module": keep(module),
          "template": template,
          "anchor": state["anchor_index"],
        }
      )
      state["prev"] = out
      return out

    def select(m):
      return linear_layers.is_linear(m) or candidate(m)

    return handler, select

  def first_calls(self, params, batches) -> list:
    self._batches = [_as_args(b) for b in batches]
    return self._rerun_calls(0, params)

  def next_calls(self, index, outputs, params, batches) -> list:
    del batches
    template = self.records[index]["template"]
    if template is None:
      return self._rerun_calls(index, params)
    anchor = self.records[index]["anchor"]
    if anchor not in self._extras:  # a resumed run starts past the anchor
      self._rerun_calls(anchor, params)
    return [
      _fill(template, out, a)
      for out, a in zip(outputs, self._extras[anchor], strict=True)
    ]

  def _rerun_calls(self, index, params) -> list:
    if not isinstance(params, (dict, nnx.State)):
      # A re-run applies the whole model: a lazily read tree
      # (qjax.io.convert.LazyParams) is read whole for it.
      params = {k: params[k] for k in params}
    calls = [self._call_of(index, params, b) for b in self._batches]
    # Arguments of chained blocks other than x are the anchor's, whichever
    # stream asked first (positions and masks do not depend on it).
    self._extras.setdefault(index, calls)
    return calls


class LinenWalk(_Walk):
  """A walk over the blocks of a Linen model (see the module docstring)."""

  def __init__(self, model, params, batches, *, blocks=None, collections=None):
    self.model = model
    self.collections = dict(collections or {})
    self.blocks_given = None if blocks is None else tuple(blocks)
    self._init_blocks(self._record(params, _as_args(batches[0])))

  def _candidate(self, path: str) -> bool:
    if self.blocks_given is not None:
      return path in self.blocks_given
    return bool(path) and "/" not in path

  def _record(self, params, batch):
    records = []
    handler, select = self._recorder(
      records,
      lambda m: self._candidate(intercept.path(m)),
      lambda m: m.clone(parent=None, name=None),
    )
    with intercept.calls(handler, select):
      self.model.apply({"params": params, **self.collections}, *batch)
    return records

  def _call_of(self, index, params, batch):
    target = self.names[index]

    def stop(module, next_fun, args, kwargs):
      raise _Stop(args, kwargs)

    # The stop sees the block's call first (its arguments as they reach
    # it), the rules (whole-model paths) every call before it.
    with (
      intercept.calls(stop, lambda m: intercept.path(m) == target),
      under_hook(""),
    ):
      try:
        self.model.apply({"params": params, **self.collections}, *batch)
      except _Stop as s:
        return s.call
    raise ValueError(f"block {target!r} was not called on this batch")

  def _module(self, name):
    return self.records[self.names.index(name)]["module"]

  def _extra(self, name) -> dict:
    return {
      c: trees.get(tree, name)
      for c, tree in self.collections.items()
      if trees.has(tree, name)
    }

  def run(self, name, block, call):
    args, kwargs = call
    variables = {"params": block, **self._extra(name)}
    enter = hook_for(name)
    if enter is not None:  # jitted: eager fake-quant compiles every op
      return capture.apply_under(
        self._module(name), variables, args, kwargs, enter
      )
    return self._module(name).apply(variables, *args, **kwargs)

  def hessians(self, name, block, calls, absmax_out=None) -> dict:
    variables = {"params": block, **self._extra(name)}
    if all(not kw for _, kw in calls):
      h, _ = capture.dense_hessians(
        self._module(name),
        variables,
        [a for a, _ in calls],
        absmax_out=absmax_out,
        enter=hook_for(name),
      )
    else:
      h, _ = capture.dense_hessians(
        self._module(name),
        variables,
        calls,
        kwargs=True,
        absmax_out=absmax_out,
        enter=hook_for(name),
      )
    return h

  def layer_order(self, name, block, call) -> list:
    args, kwargs = call
    return capture.linear_order(
      self._module(name), block, args, self._extra(name), kwargs
    )

  def layer_stats(self, name, layer, p_float, p_quant, call_f, call_q):
    kw_f, static = capture.split_kwargs(call_f[1])
    kw_q, _ = capture.split_kwargs(call_q[1])
    return capture.two_stream_stats(
      self._module(name),
      layer,
      p_float,
      p_quant,
      self._extra(name),
      call_f[0],
      call_q[0],
      kw_f,
      kw_q,
      static,
      hook_for(name),
    )


def _nnx_state_of(state, pure):
  """A copy of NNX `state` with the values of the pure dict `pure`."""
  out = jax.tree.map(lambda v: v, state)
  nnx.replace_by_pure_dict(out, pure)
  return out


class NnxWalk(_Walk):
  """A walk over the blocks of an NNX model (see the module docstring).
  Parameters are pure dicts (nnx.State.to_pure_dict())."""

  def __init__(self, model, params, batches, *, blocks=None):
    del params  # the model holds the float parameters it is recorded with
    self.model = model
    self.graphdef, self.param_state, self.rest_state = nnx.split(
      model, nnx.Param, ...
    )
    self.blocks_given = None if blocks is None else tuple(blocks)
    paths = {}
    for p, m in nnx.iter_modules(model):
      paths[id(m)] = p
    self._key_paths = paths
    self._init_blocks(self._record(_as_args(batches[0])))
    self._split = {}

  def _candidate(self, module) -> bool:
    keys = self._key_paths.get(id(module), ())
    path = "/".join(map(str, keys))
    if self.blocks_given is not None:
      return path in self.blocks_given
    return len(keys) == 1 or (len(keys) == 2 and isinstance(keys[1], int))

  def _record(self, batch):
    records = []
    handler, select = self._recorder(records, self._candidate, lambda m: m)
    with intercept.nnx_calls(self.model, handler, select):
      self.model(*batch)
    return records

  def _merged(self, params):
    return nnx.merge(
      self.graphdef,
      _nnx_state_of(self.param_state, params),
      self.rest_state,
    )

  def _call_of(self, index, params, batch):
    target = self.names[index]
    model = self._merged(params)
    module = dict(intercept.nnx_modules(model))[target]

    def stop(m, next_fun, args, kwargs):
      raise _Stop(args, kwargs)

    # NNX: the context entered last sees a call first; the stop must see
    # the block's call before the rules do (as in the Linen walk).
    with (
      under_hook("", model),
      intercept.nnx_calls(model, stop, lambda m: m is module),
    ):
      try:
        model(*batch)
      except _Stop as s:
        return s.call
    raise ValueError(f"block {target!r} was not called on this batch")

  def _block(self, name, block):
    if name not in self._split:
      module = self.records[self.names.index(name)]["module"]
      self._split[name] = nnx.split(module, nnx.Param, ...)
    graphdef, params, rest = self._split[name]
    return nnx.merge(graphdef, _nnx_state_of(params, block), rest)

  def run(self, name, block, call):
    args, kwargs = call
    module = self._block(name, block)
    with under_hook(name, module):
      return module(*args, **kwargs)

  def _each_layer(self, module, handler, call, name=None):
    """Runs `module` with handler on each linear layer, under the block
    `name`'s activation rules when given (entered last: NNX lets the last
    context see a call first, so the handler sees the quantized input)."""
    args, kwargs = call
    rules = under_hook(name, module) if name is not None else None
    with intercept.nnx_calls(module, handler, linear_layers.is_linear):
      with rules or contextlib.nullcontext():
        module(*args, **kwargs)

  def hessians(self, name, block, calls, absmax_out=None) -> dict:
    module = self._block(name, block)
    sums = {}

    def add(layer, next_fun, args, kwargs):
      x = linear_layers.input_rows(layer, args[0], args, kwargs)
      path = intercept.path(layer)
      xtx, rows, amax = sums.get(path, (0.0, 0.0, 0.0))
      amax = jnp.maximum(amax, jnp.max(jnp.abs(x), axis=-2))
      sums[path] = (xtx + capture.gram(x), rows + x.shape[-2], amax)
      return next_fun(*args, **kwargs)

    for call in calls:
      self._each_layer(module, add, call, name)

    def key(p):
      return "/".join(filter(None, (p, "kernel")))

    if absmax_out is not None:
      absmax_out.update({key(p): a for p, (_, _, a) in sums.items()})
    return {key(p): 2.0 * xtx / rows for p, (xtx, rows, _) in sums.items()}

  def layer_order(self, name, block, call) -> list:
    order = []

    def record(layer, next_fun, args, kwargs):
      order.append(intercept.path(layer))
      return next_fun(*args, **kwargs)

    self._each_layer(self._block(name, block), record, call)
    return list(dict.fromkeys(order))

  def _rows(self, name, layer, block, call, rules=False):
    got = []

    def keep(m, next_fun, args, kwargs):
      if intercept.path(m) == layer:
        got.append(linear_layers.input_rows(m, args[0], args, kwargs))
      return next_fun(*args, **kwargs)

    self._each_layer(
      self._block(name, block), keep, call, name if rules else None
    )
    return jax.numpy.concatenate(got, axis=-2)

  def layer_stats(self, name, layer, p_float, p_quant, call_f, call_q):
    x = self._rows(name, layer, p_float, call_f)
    xq = self._rows(name, layer, p_quant, call_q, rules=True)
    return (
      capture.gram(xq),
      capture.cross(xq, x),
      x.sum(-2),
      xq.sum(-2),
      jax.numpy.float32(x.shape[-2]),
    )


def discover(model, params, batches, *, blocks=None, collections=None):
  """The walk (qjax.calibration.blocks) of a Linen or NNX model.

  Args:
    model: an unbound Linen module, or an NNX module (holding its float
      parameters).
    params: its float 'params' tree (Linen), or its NNX parameter state as
      a pure dict (nnx.state(model, nnx.Param).to_pure_dict()).
    batches: calibration batches: model inputs, or tuples of them.
    blocks: module paths of the blocks ('encoder/layer_0', 'layers/3'), in
      call order; default: found (see the module docstring).
    collections: a Linen model's other variables ({'batch_stats': ...}).

  Raises:
    ValueError: no batches, no block with a linear layer, or a block called
      twice.
  """
  if not batches:
    raise ValueError("calibration needs at least one batch")
  if isinstance(model, nnx.Module):
    if collections:
      raise ValueError("an NNX model holds its own collections")
    return NnxWalk(model, params, batches, blocks=blocks)
  return LinenWalk(
    model, params, batches, blocks=blocks, collections=collections
  )
