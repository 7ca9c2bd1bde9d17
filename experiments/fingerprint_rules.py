"""The rules experiments/fingerprints.py hashes, in qjax's rule language.

Kept apart from the program so that an API change rewrites only this file
and the fingerprints (the numbers) must stay.
"""

import qjax

QAF_PATTERN = r"layer_0/(attn_out|o)/kernel"


def recipe(method: str, options: dict, fmt, scaling) -> qjax.Recipe:
  stages = method.split("+")
  if len(stages) == 1:
    options = options.get(method, options)
  pattern = QAF_PATTERN if method in ("qaf", "ftq") else "kernel"
  return qjax.Recipe(
    (qjax.rule(pattern, fmt, scaling, method=method, **options),)
  )
