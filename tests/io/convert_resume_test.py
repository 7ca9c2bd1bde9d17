"""A streamed calibrated conversion (qjax.io.convert.convert_calibrated)
killed after a block resumes from its qjax.io.resume log: the killed run
leaves no checkpoint, and the resumed one writes the checkpoint of an
uninterrupted run, calibrating only the blocks the log lacks."""

import pathlib
import shutil
import tempfile

from absl.testing import absltest

import qjax
from qjax.calibration import discover
from qjax.io import checkpoint, convert, resume, sources
from tests.io.convert_test import assert_trees_equal
from tests.io.resume_test import (
  _CountingWalk,
  _DyingLog,
  _setup,
  run_child_that_dies,
)


def convert_and_die(src, out, log, die_after):
  net, params, batches, recipe = _setup()
  convert.convert_calibrated(
    sources.open_source(src),
    recipe,
    out,
    discover(net, params, batches),
    batches,
    progress=False,
    resume=_DyingLog(log, die_after, midway=False),
  )


class ConvertResumeTest(absltest.TestCase):
  def test_killed_conversion_resumes_to_the_uninterrupted_checkpoint(self):
    net, params, batches, recipe = _setup()
    whole = qjax.quantize(params, recipe, calib=(net, batches))
    tmp = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    src, out, log = tmp / "float", tmp / "int4", tmp / "log"
    sources.save_float(src, params)
    run_child_that_dies(
      self,
      "from tests.io.convert_resume_test import convert_and_die; "
      f"convert_and_die({str(src)!r}, {str(out)!r}, {str(log)!r}, 1)",
    )
    self.assertFalse(out.exists())  # no half-written checkpoint
    self.assertLen(list(log.glob("block_*")), 2)

    source = sources.open_source(src)
    walk = _CountingWalk(discover(net, params, batches))
    summary = convert.convert_calibrated(
      source,
      recipe,
      out,
      walk,
      batches,
      progress=False,
      resume=resume.BlockLog(log),
    )
    self.assertEqual(walk.calibrated, ["block_2", "block_3"])
    assert_trees_equal(self, checkpoint.restore(out), whole)
    # the recorded blocks' leaves are in the summary too
    self.assertEqual(summary["quantized_leaves"], 8)
    self.assertIn("block_0/up/kernel", summary["leaves"])


if __name__ == "__main__":
  absltest.main()
