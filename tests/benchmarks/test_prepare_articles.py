"""bench/prepare_wikitext2.py --by-article: article starts found in a one-sentence-per-line file without titles, and
whole articles written to train / valid / test in order, read back by ``read_documents`` one document each."""
from __future__ import annotations

import random
import string

from bench.prepare_wikitext2 import find_articles, prepare_articles
from utils.data.text import read_documents


def _articles(n: int = 12, seed: int = 0) -> list[list[str]]:
    """Synthetic articles: a lead sentence naming a new subject, then sentences on a vocabulary of the article's
    own, some of them starting "It is a ..." or naming a subject of the article (which must not start a new one)."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 9)))

    out = []
    for k in range(n):
        name, vocab = word().capitalize(), [word() for _ in range(12)]
        lines = [f"{name} {word().capitalize()} , known as the {vocab[0]} , is a {vocab[1]} of the {vocab[2]} ."]
        for i in range(rng.randint(25, 45)):
            w = rng.sample(vocab, 4)
            lines.append(f"It is a {w[0]} of {w[1]} ." if i % 7 == 3 else
                         f"{name} was the {w[0]} of {w[1]} and the {w[2]} by {w[3]} .")
        out.append(lines)
    return out


def test_article_starts_are_found_in_a_file_without_titles():
    articles = _articles()
    lines = [line for a in articles for line in a]
    starts = [sum(len(a) for a in articles[:k]) for k in range(len(articles))]
    assert find_articles(lines) == starts


def test_articles_written_whole_in_order_with_title_lines(tmp_path, capsys):
    texts = ["\n".join(a) for a in _articles()]
    written = prepare_articles(texts, tmp_path, (0.6, 0.2, 0.2))
    assert written["train"] + written["valid"] + written["test"] == texts  # in order, no article in two splits
    assert len(written["train"]) > len(written["valid"]) >= 1 and written["test"]
    docs = read_documents(tmp_path / "valid.txt")
    first = len(written["train"]) + 1
    assert [d.text for d in docs] == [f" = Article {first + k} = \n{t}\n" for k, t in enumerate(written["valid"])]
    assert "valid: " in capsys.readouterr().out


def test_articles_with_their_own_titles_keep_them(tmp_path):
    prepare_articles([" = Own = \nfirst text .", "second text .", "third text ."], tmp_path, (0.4, 0.3, 0.3))
    assert (tmp_path / "train.txt").read_text() == " = Own = \nfirst text .\n"
    assert (tmp_path / "test.txt").read_text() == " = Article 3 = \nthird text .\n"
