"""MobileNetV2 without torch: the reader, a NumPy conv check, photo labels."""

import pickle
import tempfile

import numpy as np
from absl.testing import absltest

from qjax.models import mobilenet_v2, torch_legacy


class TorchLegacyTest(absltest.TestCase):
  def test_reads_every_tensor(self):
    w = torch_legacy.load(mobilenet_v2._weights_file())
    self.assertLen(w, 314)
    self.assertEqual(w["features.0.0.weight"].shape, (32, 3, 3, 3))
    # torchvision's 3,504,872 parameters plus BN means and variances.
    self.assertEqual(
      sum(v.size for k, v in w.items() if "num_batches" not in k),
      3_504_872 + 2 * 17_056,
    )

  def test_refuses_code_and_truncation(self):
    path = tempfile.mktemp()
    with open(path, "wb") as f:
      for obj in (torch_legacy.MAGIC, 1001, {}):
        pickle.dump(obj, f)
      f.write(b"cos\nsystem\n(S'echo hacked'\ntR.")  # os.system call
    with self.assertRaisesRegex(ValueError, "refusing to load os.system"):
      torch_legacy.load(path)
    data = open(mobilenet_v2._weights_file(), "rb").read()
    with open(path, "wb") as f:
      f.write(data[: len(data) - 1000])
    with self.assertRaisesRegex(ValueError, "truncated"):
      torch_legacy.load(path)


class MobileNetV2Test(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.variables = mobilenet_v2.load_variables()

  def test_stem_matches_numpy_conv(self):
    x = mobilenet_v2.photos(1)[:1, :16, :16]
    got = np.asarray(
      mobilenet_v2.ConvBN(32, 3, 2).apply(
        {
          "params": self.variables["params"]["stem"],
          "batch_stats": self.variables["batch_stats"]["stem"],
        },
        x,
      )
    )[0]
    w = torch_legacy.load(mobilenet_v2._weights_file())
    k = w["features.0.0.weight"].astype(np.float64)  # [out, in, 3, 3]
    padded = np.pad(x[0].astype(np.float64), ((1, 1), (1, 1), (0, 0)))
    want = np.zeros((8, 8, 32))
    for i in range(8):
      for j in range(8):
        patch = padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # [3, 3, in]
        want[i, j] = np.einsum("hwc,ochw->o", patch, k)
    bn = "features.0.1."
    want = (want - w[bn + "running_mean"]) / np.sqrt(
      w[bn + "running_var"] + 1e-5
    ) * w[bn + "weight"] + w[bn + "bias"]
    np.testing.assert_allclose(got, np.clip(want, 0, 6), atol=1e-4)

  def test_photos_get_sensible_labels(self):
    names = mobilenet_v2.class_names()
    logits = np.asarray(
      mobilenet_v2.logits(
        self.variables["params"],
        self.variables["batch_stats"],
        mobilenet_v2.photos(1),
      )
    )
    top = {
      p: [names[i].lower() for i in np.argsort(-row)[:3]]
      for p, row in zip(mobilenet_v2.PHOTOS, logits, strict=True)
    }
    self.assertEqual(top["coffee"][0], "espresso")
    self.assertTrue(any("cat" in n or "mau" in n for n in top["chelsea"]))
    self.assertTrue(
      any(n in ("moped", "motor scooter") for n in top["stereo_motorcycle"])
    )


if __name__ == "__main__":
  absltest.main()
