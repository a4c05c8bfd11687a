"""Builds the built-in list of frequent English nouns and adjectives.

Walks the English word-frequency list of the `wordfreq` package from the
most frequent word down and keeps lowercase alphabetic words whose most
likely part of speech, per the Brill lexicon shipped inside `textblob`
(`textblob/en/en-lexicon.txt`), is a singular common noun (NN) or a plain
adjective (JJ). Like the COCA lemma list that the FACE authors used, this
gives each word its dominant part of speech and leaves out inflected forms
(plurals, comparatives). Single letters are left out: the lexicon tags most
of them as nouns, but they describe nothing.

Only this builder needs the two packages; face_jax reads the committed
result. To rebuild it (the output is deterministic for these versions):

  pip install wordfreq==3.1.1 textblob==0.20.1
  python -m face_jax.llm.build_word_list
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

from absl import app, flags

_OUTPUT = flags.DEFINE_string(
  "output",
  str(
    pathlib.Path(__file__).resolve().parent.parent
    / "resources"
    / "english_nouns_adjectives.txt"
  ),
  "Where to write the list.",
)
_MAX_WORDS = flags.DEFINE_integer(
  "max_words", 30000, "Stop after this many words."
)

# Penn Treebank tags kept: singular or mass noun, adjective.
KEPT_TAGS = ("NN", "JJ")
PINNED = {"wordfreq": "3.1.1", "textblob": "0.20.1"}
_WORD = re.compile(r"[a-z]{2,}")


def read_lexicon() -> dict[str, str]:
  """Word -> most likely Penn tag, from textblob's copy of Brill's lexicon."""
  path = importlib.metadata.distribution("textblob").locate_file(
    "textblob/en/en-lexicon.txt"
  )
  tags = {}
  for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
    if line.startswith(";;;"):
      continue
    fields = line.split()
    # The first tag listed is the word's most frequent one.
    if len(fields) >= 2 and fields[0] not in tags:
      tags[fields[0]] = fields[1]
  return tags


def build(max_words: int) -> list[str]:
  """The first `max_words` frequent nouns and adjectives, most frequent
  first."""
  try:
    import wordfreq
  except ImportError as error:
    raise SystemExit(
      "Building the word list needs `pip install wordfreq==3.1.1 "
      "textblob==0.20.1`."
    ) from error
  lexicon = read_lexicon()
  words = []
  for word in wordfreq.iter_wordlist("en", wordlist="large"):
    if _WORD.fullmatch(word) and lexicon.get(word) in KEPT_TAGS:
      words.append(word)
      if len(words) == max_words:
        break
  return words


def main(argv):
  del argv
  for package, version in PINNED.items():
    found = importlib.metadata.version(package)
    if found != version:
      raise SystemExit(
        f"{package} {found} is installed; the committed list was built with "
        f"{version}. Install that version to reproduce it."
      )
  words = build(_MAX_WORDS.value)
  output = pathlib.Path(_OUTPUT.value)
  output.write_text("\n".join(words) + "\n", encoding="utf-8")
  print(f"wrote {len(words)} words to {output}")


if __name__ == "__main__":
  app.run(main)
