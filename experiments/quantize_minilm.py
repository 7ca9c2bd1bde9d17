"""Quantize all-MiniLM-L6-v2 with recipes; report size and quality.

  .venv/bin/python -m experiments.quantize_minilm
  .venv/bin/python -m experiments.quantize_minilm --recipes=mxfp4,int4_g128

Quality is the cosine similarity of each sentence embedding to the float
model's, over the sentences below, and the mean SQNR of the Dense kernels.
Size counts the quantized kernels (codes + scales) against float32.
"""

import numpy as np
from absl import app, flags

import qjax
from qjax import formats
from qjax.models import minilm

RECIPES = {
  "mxfp8_e4m3": lambda: qjax.Recipe((qjax.rule("kernel", "mxfp8_e4m3"),)),
  "int8_channel": lambda: qjax.Recipe(
    (qjax.rule("kernel", "int8", formats.per_channel()),)
  ),
  "mxfp6_e2m3": lambda: qjax.Recipe((qjax.rule("kernel", "mxfp6_e2m3"),)),
  "nvfp4": lambda: qjax.Recipe((qjax.rule("kernel", "nvfp4"),)),
  "mxfp4": lambda: qjax.Recipe((qjax.rule("kernel", "mxfp4"),)),
  "int4_g128": lambda: qjax.Recipe(
    (
      qjax.rule(
        "kernel", "int4", formats.per_block(128, scale_format="bfloat16")
      ),
    )
  ),
  "int3_g32_clip": lambda: qjax.Recipe(
    (
      qjax.rule(
        "kernel",
        "int3",
        formats.per_block(32, scale_format="bfloat16"),
        clip_ratios=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75),
      ),
    )
  ),
}
SENTENCES = [
  "In the beginning God created the heaven and the earth.",
  "A man is playing a guitar on the street.",
  "Someone performs music with a stringed instrument.",
  "The stock market fell sharply after the announcement.",
  "Quantization stores each weight in fewer bits.",
  "The cat slept on the warm windowsill all afternoon.",
  "Rain is expected across the north tomorrow morning.",
  "She solved the equation by completing the square.",
]
_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), "recipes to compare")


def main(argv):
  del argv
  unknown = set(_RECIPES.value) - set(RECIPES)
  if unknown:
    raise app.UsageError(
      f"unknown recipes {sorted(unknown)}; choices: {', '.join(RECIPES)}"
    )
  params = minilm.load_params()
  ids, mask = minilm.encode(minilm.tokenizer(), SENTENCES)
  reference = np.asarray(minilm.embed(params, ids, mask))
  print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences\n")
  print(
    "| recipe | bits/weight | kernel bytes | vs float32 | mean SQNR dB |"
    " cosine mean | cosine min |"
  )
  print("|---|---|---|---|---|---|---|")
  for name in _RECIPES.value:
    q = qjax.quantize(params, RECIPES[name]())
    stats = [s for s in qjax.stats(q, params).values() if s["quantized"]]
    nbytes = sum(s["bytes"] for s in stats)
    n = sum(8 * s["bytes"] / s["bits_per_weight"] for s in stats)
    emb = np.asarray(minilm.embed(qjax.dequantize(q), ids, mask))
    cos = np.sum(emb * reference, axis=-1)
    print(
      f"| {name} | {8 * nbytes / n:.3f} | {nbytes} | "
      f"{nbytes / (4 * n):.4f} | "
      f"{np.mean([s['sqnr_db'] for s in stats]):.1f} | "
      f"{cos.mean():.4f} | {cos.min():.4f} |"
    )


if __name__ == "__main__":
  app.run(main)
