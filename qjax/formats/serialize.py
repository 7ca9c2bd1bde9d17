"""Formats <-> JSON-able dicts, for checkpoint metadata."""

import dataclasses

from qjax.formats.exmy import ExMy
from qjax.formats.integer import Codebook, IntFormat

_KINDS = {"exmy": ExMy, "int": IntFormat, "codebook": Codebook}


def format_to_dict(fmt) -> dict:
  for kind, cls in _KINDS.items():
    if type(fmt) is cls:
      d = dataclasses.asdict(fmt)
      if kind == "codebook":
        d["table"] = list(d["table"])
      return {"kind": kind, **d}
  raise TypeError(f"not a qjax element format: {fmt!r}")


def format_from_dict(d: dict):
  d = dict(d)
  kind = d.pop("kind", None)
  if kind not in _KINDS:
    raise ValueError(f"unknown format kind {kind!r} in metadata")
  if kind == "codebook":
    d["table"] = tuple(d["table"])
  return _KINDS[kind](**d)
