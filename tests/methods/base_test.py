"""The method protocol: chains, names, options and statistics."""

import jax
import numpy as np
from absl.testing import absltest

import qjax
from qjax import formats
from qjax.methods import base, names


class ChainTest(absltest.TestCase):
  def test_stages_run_in_order_and_needs_are_the_union(self):
    c = qjax.chain(qjax.MagR(statistics="last_sample"), qjax.GPTQ())
    self.assertEqual(c.needs, frozenset({"last_sample", "hessian"}))
    self.assertEqual(c.name, "magr+gptq")
    self.assertEqual(
      qjax.chain(c, qjax.CoordinateDescent()).name, "magr+gptq+cd"
    )
    with self.assertRaisesRegex(ValueError, "transforms -> quantizer"):
      qjax.chain(qjax.GPTQ(), qjax.MagR())
    with self.assertRaisesRegex(ValueError, "exactly one quantizer"):
      qjax.chain(qjax.RTN(), qjax.GPTQ())
    with self.assertRaisesRegex(ValueError, "exactly one quantizer"):
      qjax.chain(qjax.Pipe(order=2))
    with self.assertRaisesRegex(ValueError, "is not a method"):
      qjax.chain(lambda w: w)

  def test_equal_methods_are_equal_and_hashable(self):
    a = qjax.chain(qjax.RTN(clip_ratios=[1.0, 0.9]))
    b = qjax.chain(qjax.RTN(clip_ratios=(1.0, 0.9)))
    self.assertEqual(a, b)
    self.assertEqual(hash(a), hash(b))
    self.assertNotEqual(a, qjax.chain(qjax.RTN()))

  def test_a_refinement_sees_the_original_and_the_transformed_weight(self):
    w = jax.random.normal(jax.random.key(0), (64, 8))
    x = jax.random.normal(jax.random.key(1), (256, 64))
    stats = qjax.Stats(hessian=2 * x.T @ x / 256)
    fmt, scaling = formats.get("int3"), formats.per_channel()
    c = qjax.chain(
      qjax.MagR(iters=10), qjax.GPTQ(), qjax.CoordinateDescent(sweeps=2)
    )
    got = c(w, fmt, scaling, stats).leaf
    w_magr = qjax.MagR(iters=10).transform(w, stats)
    first = qjax.GPTQ().quantize(w_magr, fmt, scaling, stats).leaf
    from qjax.quantizers import coordinate_descent

    want = coordinate_descent.refine(w, first, stats.hessian, sweeps=2)[0]
    np.testing.assert_array_equal(got.codes, want.codes)


class NamesTest(absltest.TestCase):
  def test_shorthands(self):
    self.assertEqual(names.from_name("gptq"), qjax.chain(qjax.GPTQ()))
    self.assertEqual(
      names.from_name("pipe", {"order": 3}),
      qjax.chain(qjax.RTN(), qjax.Pipe(order=3)),
    )
    self.assertEqual(
      names.from_name("magr"), qjax.chain(qjax.MagR(), qjax.RTN())
    )
    self.assertEqual(
      names.from_name("magr+gptq+cd", {"cd": {"sweeps": 2}}),
      qjax.chain(qjax.MagR(), qjax.GPTQ(), qjax.CoordinateDescent(sweeps=2)),
    )
    with self.assertRaisesRegex(ValueError, "repeats a stage"):
      names.from_name("rtn+rtn")
    with self.assertRaisesRegex(ValueError, "options per stage"):
      names.from_name("magr+gptq", {"alpha": 1e-3})
    # Every method qjax ships has a name, and the table lists them all.
    exported = {
      getattr(qjax, n)
      for n in qjax.__all__
      if isinstance(getattr(qjax, n), type)
    }
    shipped = {c for c in exported if issubclass(c, base.Method)}
    shipped -= {base.Method, base.Transform, base.Quantizer, base.Refinement}
    self.assertEqual(set(names.BY_NAME.values()), shipped)

  def test_options_out_of_range_fail_at_build(self):
    for make, message in (
      (lambda: qjax.RTN(rounding="up"), "rounding must be one of"),
      (lambda: qjax.ErrorDiffusion(adjust="x"), "adjust must be one of"),
      (lambda: qjax.GPFQ(scales="x"), "scales must be one of"),
      (lambda: qjax.MagR(projection="x"), "projection must be one of"),
      (lambda: qjax.Pipe(order=1.5), "order must be an integer"),
      (lambda: qjax.Pipe(order=2, keep=(0.5, 0.5)), "keep has 2 entries"),
      (lambda: qjax.CoordinateDescent(sweeps=-1), "sweeps must be >= 0"),
    ):
      with self.assertRaisesRegex(ValueError, message):
        make()

  def test_formats_a_method_cannot_use_fail_at_build(self):
    with self.assertRaisesRegex(ValueError, "needs a signed, symmetric grid"):
      qjax.rule(
        "k",
        "uint4",
        formats.per_channel(zero_point=True),
        method="pipe",
        order=2,
      )
    with self.assertRaisesRegex(ValueError, "tensor scale"):
      qjax.rule("k", "nvfp4", method="pipe", order=2)
    with self.assertRaisesRegex(ValueError, "input axis"):
      qjax.rule("k", "int4", formats.per_block(32, axis=1), method="gptq")
    # QAF and FTQ default to one scale per factor.
    self.assertEqual(
      qjax.rule("k", "int4", method="qaf", rate=2).scaling.mode, "tensor"
    )
    self.assertEqual(qjax.rule("k", "int4").scaling, formats.per_channel(-1))


class StatsTest(absltest.TestCase):
  def test_available(self):
    self.assertEqual(qjax.Stats().available(), frozenset())
    h = np.eye(2)
    self.assertEqual(
      qjax.Stats(hessian=h, g=h, c=h).available(),
      frozenset({"hessian", "two_stream"}),
    )


if __name__ == "__main__":
  absltest.main()
