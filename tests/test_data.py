import torch

from handgrad.data import Vocab, build_examples, load_words, make_dataset, prepare_words


def test_names_txt_examples_split(names_txt):
    ds = make_dataset(names_txt, block_size=3, split="examples")
    assert ds.sizes() == {"train": 169_062, "val": 21_133, "test": 21_133}
    assert len(ds.vocab) == 27
    assert ds.X["train"].shape == (169_062, 3)


def test_words_split_is_80_10_10_of_words(names_txt):
    ds = make_dataset(names_txt, split="words")
    assert len(ds.words) == 29_494
    n_train_words = int(0.8 * 29_494)
    n_train_examples = sum(len(w) + 1 for w in ds.words[:n_train_words])
    assert ds.sizes()["train"] == n_train_examples


def test_builtin_names():
    words = load_words(None)
    assert len(set(words)) == 5163
    assert all(w == w.lower() for w in words)
    ds = make_dataset(None)
    assert len(ds.words) == 5163 and len(ds.vocab) == 27


def test_shuffle_is_deterministic_and_independent_of_input_order():
    words = ["b", "a", "c", "a", "d", "e"]
    assert prepare_words(words, 42) == prepare_words(list(reversed(words)), 42)
    assert sorted(prepare_words(words, 42)) == ["a", "b", "c", "d", "e"]


def test_boundary_token_is_not_a_data_character():
    vocab = Vocab.from_words(["a.b", "..", "c"])
    assert len(vocab) == 5  # boundary + '.', 'a', 'b', 'c'
    assert Vocab.BOUNDARY not in vocab.encode("a.b")
    assert vocab.decode(vocab.encode("a.b") + [0, 1]) == "a.b"
    X, Y = build_examples(["a.b"], vocab, 2)
    a, dot, b = vocab.stoi["a"], vocab.stoi["."], vocab.stoi["b"]
    assert X.tolist() == [[0, 0], [0, a], [a, dot], [dot, b]]
    assert Y.tolist() == [a, dot, b, 0]


def test_crlf_whitespace_and_blank_lines(tmp_path):
    f = tmp_path / "w.txt"
    f.write_bytes("  anna \r\n\r\nbob\r\n\n  \nzoë\r\n".encode())
    assert load_words(f) == ["anna", "bob", "zoë"]


def test_examples_cover_every_character_and_the_end():
    vocab = Vocab.from_words(["ab"])
    X, Y = build_examples(["ab"], vocab, 3)
    assert X.shape == (3, 3) and torch.equal(Y, torch.tensor([1, 2, 0]))


def test_sequence_data_counts_exactly_the_predictions_the_examples_count():
    from handgrad.data import IGNORE, make_sequence_dataset

    ex, seq = make_dataset(None, block_size=3), make_sequence_dataset(None)
    assert seq.sequences and not ex.sequences
    assert seq.words == ex.words  # the same shuffle, so the same words in each split
    assert seq.targets() == ex.targets() == ex.sizes()
    longest = max(map(len, seq.words)) + 1
    assert seq.block_size == longest and seq.X["train"].shape[1] == longest
    # a row: the start token and the characters in; the characters and the end token out; padding ignored
    n_train = int(0.8 * len(seq.words))
    for row, w in enumerate(seq.words[:n_train][:50]):
        ids = seq.vocab.encode(w)
        assert seq.X["train"][row, : len(ids) + 1].tolist() == [Vocab.BOUNDARY] + ids
        assert seq.Y["train"][row, : len(ids) + 1].tolist() == ids + [Vocab.BOUNDARY]
        assert (seq.Y["train"][row, len(ids) + 1:] == IGNORE).all()
        assert (seq.X["train"][row, len(ids) + 1:] == Vocab.BOUNDARY).all()
    # each target but the end token is the next position's input: the shift by one
    X, Y = seq.X["train"], seq.Y["train"]
    inner = (Y[:, :-1] != IGNORE) & (Y[:, :-1] != Vocab.BOUNDARY)
    assert torch.equal(X[:, 1:][inner], Y[:, :-1][inner]) and inner.sum() > 1000


def test_sequence_items_longer_than_the_context_are_refused_or_cut_with_a_warning(tmp_path, capsys):
    import pytest

    from handgrad.data import make_sequence_dataset
    from handgrad.errors import HandgradError

    path = tmp_path / "d.txt"
    path.write_text("\n".join(["abcdefgh", "ab", "abc", "b", "c", "d", "cab", "bad", "dab", "ca", "ac"]) + "\n")
    with pytest.raises(HandgradError, match="1 items are longer than the context of 5 positions .*needs 9"):
        make_sequence_dataset(path, context=5)
    ds = make_sequence_dataset(path, context=5, cut=True)
    assert "cut 1 items longer than the context of 5" in capsys.readouterr().err
    assert "abcd" in ds.words and ds.X["train"].shape[1] == 5
    assert sum(ds.targets().values()) == sum(len(w) + 1 for w in ds.words)
