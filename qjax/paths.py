"""Parameter paths: the '/'-joined keys that rules match and files name."""


def path_str(path) -> str:
  """'/'-joined keys of a jax tree path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)
