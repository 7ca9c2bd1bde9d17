"""The code blocks of docs/own_model.md run as written."""

import pathlib
import re
import warnings

import jax
from absl.testing import absltest, parameterized

import qjax

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "own_model.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


class OwnModelPageTest(parameterized.TestCase):
  def test_page_has_both_paths_under_30_lines_each(self):
    blocks = _blocks()
    self.assertLen(blocks, 2)
    for block in blocks:
      self.assertLessEqual(len(block.strip().splitlines()), 30)

  @parameterized.parameters(0, 1)
  def test_block_runs(self, index):
    scope = {}
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      exec(compile(_blocks()[index], f"own_model.md[{index}]", "exec"), scope)
    q = scope["qparams"]
    leaves = jax.tree_util.tree_leaves(q, is_leaf=qjax.qtensor.is_quantized)
    self.assertTrue(any(isinstance(x, qjax.QTensor) for x in leaves))
    self.assertEqual(scope["logits"].shape[0], 4)


if __name__ == "__main__":
  absltest.main()
