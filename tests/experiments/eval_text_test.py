"""SmolLM2's evaluation text: the KJV by default, or a UTF-8 file of the
user's (config eval.text), tokenized from its start into windows."""

import pathlib
import tempfile

from absl.testing import absltest

from configs import smollm2 as smollm2_config
from experiments import tasks
from qjax.models import smollm2


class EvalTextTest(absltest.TestCase):
  def test_windows_come_from_the_file(self):
    text = " ".join(f"Sentence number {i} of a corpus." for i in range(200))
    with tempfile.TemporaryDirectory() as d:
      path = pathlib.Path(d) / "corpus.txt"
      path.write_text(text, encoding="utf-8")
      got = tasks.SmolLM2Task._windows(16, 3, str(path))
    want = smollm2.tokenizer().encode(text).ids[:48]
    self.assertEqual(got.reshape(-1).tolist(), want)
    kjv = tasks.SmolLM2Task._windows(16, 3)
    self.assertNotEqual(kjv.reshape(-1).tolist(), want)

  def test_short_file_is_an_error(self):
    with tempfile.TemporaryDirectory() as d:
      path = pathlib.Path(d) / "short.txt"
      path.write_text("too short", encoding="utf-8")
      with self.assertRaisesRegex(ValueError, "short.txt: need 4096 tokens"):
        tasks.SmolLM2Task._windows(512, 8, str(path))

  def test_config_field(self):
    c = smollm2_config.get_config("text=/data/wiki.test.raw")
    self.assertEqual(c.eval.text, "/data/wiki.test.raw")


if __name__ == "__main__":
  absltest.main()
