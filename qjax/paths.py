"""Parameter paths: the '/'-joined keys that rules match and files name."""

import re


def path_str(path) -> str:
  """'/'-joined keys of a jax tree path. The trailing '.value' of an NNX
  Variable is dropped, so an NNX state's kernel is 'layers/0/q/kernel' as
  a Linen tree's is."""
  path = tuple(path)
  if path and getattr(path[-1], "name", None) == "value":
    path = path[:-1]
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def check_regex(pattern: str, what: str = "rule pattern") -> None:
  """Raises ValueError naming `what` when `pattern` is not a regex."""
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} {pattern!r} is not a regex: {e}") from e
