"""The format spec grammar: every listed spec parses, round-trips, and means
what ml_dtypes and the OCP MX spec say it means; bad specs say what is wrong."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

import qjax
from qjax import formats
from qjax.formats import spec

ELEMENT_SPECS = [
  "e4m3fn",
  "e5m2ieee",
  "e4m3ieee",
  "e3m4ieee",
  "e5m2b16fnuz",
  "e4m3b8fnuz",
  "e4m3b11fnuz",
  "e2m1",
  "e3m2",
  "e2m3",
  "e3m3",
  "e1m2",
  "e5m1",
  "e8m0",
  "int2",
  "int4",
  "int8",
  "uint3",
  "uint8",
  "nf4",
  "e4m3fn@away",
  "e2m1@zero",
  "int4@away",
  "e4m3b5fn",
  "e2m1fnuz",
]
BLOCK_SPECS = [
  "mxfp8e4",
  "mxfp8e5",
  "mxfp6e3",
  "mxfp6e2",
  "mxfp4",
  "mxint8",
  "mxint4",
  "nvfp4",
  "bfp16",
  "bfp12",
  "bfp10",
  "mxfp4@midmax",
  "bfp16@midmax",
]
# Spec -> ml_dtypes type with exactly that meaning.
ML_DTYPES = {
  "e4m3fn": ml_dtypes.float8_e4m3fn,
  "e5m2ieee": ml_dtypes.float8_e5m2,
  "e4m3ieee": ml_dtypes.float8_e4m3,
  "e3m4ieee": ml_dtypes.float8_e3m4,
  "e5m2b16fnuz": ml_dtypes.float8_e5m2fnuz,
  "e4m3b8fnuz": ml_dtypes.float8_e4m3fnuz,
  "e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz,
  "e2m1": ml_dtypes.float4_e2m1fn,
  "e3m2": ml_dtypes.float6_e3m2fn,
  "e2m3": ml_dtypes.float6_e2m3fn,
  "e8m0": ml_dtypes.float8_e8m0fnu,
}


class SpecTest(parameterized.TestCase):
  @parameterized.parameters(*ELEMENT_SPECS, *BLOCK_SPECS)
  def test_round_trip(self, text):
    parsed = spec.parse(text)
    self.assertEqual(spec.to_spec(parsed), text)
    self.assertEqual(spec.parse(spec.to_spec(parsed)), parsed)
    self.assertEqual(spec.parse(text.upper()), parsed)

  @parameterized.parameters(*ML_DTYPES)
  def test_decodes_like_ml_dtypes(self, text):
    fmt = spec.parse(text)
    dtype = ML_DTYPES[text]
    bits = np.dtype(dtype).itemsize * 8
    n = 2 ** (4 if "e2m1" in text else 6 if text in ("e3m2", "e2m3") else 8)
    codes = np.arange(n, dtype=np.uint8)
    want = codes.view(dtype) if bits == 8 and n == 256 else None
    if want is None:  # sub-byte types: ml_dtypes stores one code per byte
      want = codes.view(np.uint8).astype(np.uint8).view(dtype)
    got = np.asarray(fmt.decode(jnp.asarray(codes)))
    want = want.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])
    # Signs of zero count too (fnuz has none, ieee has two).
    np.testing.assert_array_equal(np.signbit(got[ok]), np.signbit(want[ok]))

  def test_qjax_names_parse_to_the_same_objects(self):
    for name in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "e3m3"):
      self.assertEqual(spec.parse(name), formats.get(name))
      self.assertEqual(
        formats.get(spec.to_spec(formats.get(name))), formats.get(name)
      )
    for name in formats.BLOCK_FORMATS:
      self.assertEqual(tuple(spec.parse(name)), formats.block_format(name))

  def test_block_meanings(self):
    cases = {  # spec: (element max, block, scale format, tensor scale)
      "mxfp8e4": (448, 32, "e8m0", False),
      "mxfp6e2": (7.5, 32, "e8m0", False),
      "mxint8": (127 / 64, 32, "e8m0", False),
      "mxint4": (7 / 4, 32, "e8m0", False),
      "nvfp4": (6, 16, "float8_e4m3fn", True),
      "bfp16": (127 / 64, 8, "e8m0", False),
      "bfp12": (7 / 4, 8, "e8m0", False),
    }
    for text, (top, size, scale, tensor) in cases.items():
      element, scaling = spec.parse(text, axis=-2)
      self.assertEqual(float(element.max), top, text)
      self.assertEqual(scaling.sizes, (size,))
      self.assertEqual(scaling.axes, (-2,))
      self.assertEqual(
        (scaling.scale_format, scaling.tensor_scale), (scale, tensor)
      )
    # bfp16 costs 8 + 8/8 bits per element.
    w = jnp.linspace(-1, 1, 64 * 16).reshape(64, 16)
    q = qjax.rtn(w, *spec.parse("bfp16"))
    self.assertEqual(q.bits_per_weight, 9.0)

  def test_rounding_suffix_changes_ties(self):
    x = jnp.array([0.5, 1.5, 2.5, -2.5])
    even = spec.parse("int4").encode(x)
    away = spec.parse("int4@away").encode(x)
    zero = spec.parse("int4@zero").encode(x)
    decode = spec.parse("int4").decode
    np.testing.assert_array_equal(decode(even), [0, 2, 2, -2])
    np.testing.assert_array_equal(decode(away), [1, 2, 3, -3])
    np.testing.assert_array_equal(decode(zero), [0, 1, 2, -2])

  def test_usable_in_recipes_and_configs(self):
    from configs import minilm
    from experiments import run_lib

    rule = qjax.rule("kernel", "mxfp6e3")
    self.assertEqual(
      (rule.fmt, rule.scaling), formats.block_format("mxfp6_e3m2", axis=-2)
    )
    self.assertEqual(
      qjax.rule("kernel", "e4m3fn", formats.per_channel()).fmt,
      formats.get("float8_e4m3fn"),
    )
    config = minilm.get_config("format=bfp16")
    self.assertEqual(run_lib.run_name(config), "minilm_rtn_bfp16")
    recipe = run_lib.recipe_from_config(config)
    self.assertEqual(recipe.rules[0].scaling.sizes, (8,))

  @parameterized.parameters(
    ("e9m2", "'e9m2' needs 1..8 exponent"),
    ("e4m3xx", "'xx' is not a suffix"),
    ("e4m0", "'e4m0' has no mantissa"),
    ("int1", "'int1' needs K in 2..16"),
    ("int17", "'int17' needs K in 2..16"),
    ("bfp9", "'bfp9' needs N - 8"),
    ("mxfp9", "'mxfp9' is not a known block format"),
    ("e4m3fn@up", "'@up' is not a rounding mode"),
    ("e4m3fn@stochastic", "needs a key"),
    ("nf4@away", "does not apply to a codebook"),
    ("float9", "'float9' is not a known format"),
    ("nvfp4@midmax", "'@midmax' is not a scale rule"),
    ("e5m2b-999", "'e5m2b-999' is not a valid float.*overflows float32"),
    ("e5m2b999", "'e5m2b999' is not a valid float.*below float32"),
  )
  def test_bad_specs_name_the_part(self, text, message):
    with self.assertRaisesRegex(ValueError, message) as ctx:
      spec.parse(text)
    self.assertIn("Valid forms", str(ctx.exception))

  def test_inexpressible_formats_are_refused(self):
    with self.assertRaisesRegex(ValueError, "cannot express"):
      spec.to_spec(formats.ExMy(4, 3, special="fn", overflow="saturate"))
    with self.assertRaisesRegex(ValueError, "no spec"):
      spec.to_spec(formats.Codebook((0.0, 1.0), name="tiny"))


if __name__ == "__main__":
  absltest.main()
