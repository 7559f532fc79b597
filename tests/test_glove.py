"""GloVe encoder: vectors from files and the kumo package, tokenisation, OOV accounting, layers."""

import numpy as np
import pytest
import torch

from framework.data import Layer
from framework.errors import LayerprobeError
from plugins.glove import GloveEncoder, GloveOptions
from plugins.pooling import MeanPooler

from conftest import WORDS


def encode_all(encoder, sentences):
    batches = list(encoder.encode(sentences, Layer()))
    vectors = torch.zeros(len(sentences), encoder.vectors.matrix.shape[1])
    counts = {}
    for batch in batches:
        vectors[batch.sentence_index] = MeanPooler().pool(batch)
        for key, value in batch.counts.items():
            counts[key] = counts.get(key, 0) + value
    return vectors, counts


def test_states_are_the_word_vectors_and_oov_is_counted(tiny_vectors):
    encoder = GloveEncoder(GloveOptions(vectors=str(tiny_vectors)))
    rows = {line.split()[0]: np.array(line.split()[1:], dtype=np.float32)
            for line in tiny_vectors.read_text().splitlines()}
    vectors, counts = encode_all(encoder, ["The CAT zzz", "qqq www", "", "dog"])
    assert torch.allclose(vectors[0], torch.from_numpy((rows["the"] + rows["cat"]) / 2), atol=1e-6)
    assert torch.equal(vectors[1], torch.zeros(8)) and torch.equal(vectors[2], torch.zeros(8))
    assert torch.allclose(vectors[3], torch.from_numpy(rows["dog"]))
    assert counts == {"tokens": 6, "oov_tokens": 3, "empty_sentences": 1, "sentences_without_known_tokens": 2}


def test_word2vec_header_and_small_batches_give_the_same_vectors(tmp_path, tiny_vectors):
    lines = tiny_vectors.read_text().splitlines()
    with_header = tmp_path / "w2v.txt"
    with_header.write_text(f"{len(lines)} 8\n" + "\n".join(lines) + "\n")
    sentences = ["the cat sat on the mat", "dog", "stocks fell sharply today", "a cat"]
    plain, _ = encode_all(GloveEncoder(GloveOptions(vectors=str(tiny_vectors))), sentences)
    batched, _ = encode_all(GloveEncoder(GloveOptions(vectors=str(with_header), batch_tokens=4)), sentences)
    assert torch.allclose(plain, batched)


def test_regex_tokenizer_splits_punctuation(tiny_vectors):
    whitespace = GloveEncoder(GloveOptions(vectors=str(tiny_vectors)))
    regex = GloveEncoder(GloveOptions(vectors=str(tiny_vectors), tokenizer="regex"))
    assert whitespace.tokenize("The cat, sat.") == ["the", "cat,", "sat."]
    assert regex.tokenize("The cat, sat.") == ["the", "cat", ",", "sat", "."]


def test_glove_has_no_layers(tiny_vectors):
    encoder = GloveEncoder(GloveOptions(vectors=str(tiny_vectors)))
    assert encoder.resolve_layer(None) == Layer() and encoder.resolve_layer(0) == Layer()
    with pytest.raises(LayerprobeError, match="glove has no layers.*layer=3"):
        encoder.resolve_layer(3)


def test_bad_options_fail_where_they_enter(tmp_path):
    with pytest.raises(LayerprobeError, match="no such file"):
        GloveEncoder(GloveOptions(vectors=str(tmp_path / "missing.txt")))
    with pytest.raises(LayerprobeError, match="tokenizer=spacy is unknown"):
        GloveEncoder(GloveOptions(tokenizer="spacy"))


def test_fingerprint_changes_with_tokenisation(tiny_vectors):
    a = GloveEncoder(GloveOptions(vectors=str(tiny_vectors))).fingerprint()
    b = GloveEncoder(GloveOptions(vectors=str(tiny_vectors), lowercase=False)).fingerprint()
    assert a != b and a == GloveEncoder(GloveOptions(vectors=str(tiny_vectors))).fingerprint()


def test_default_vectors_are_glove_6b_50d_from_the_kumo_package():
    vectors = GloveEncoder(GloveOptions()).vectors
    assert vectors.matrix.shape == (400_001, 50)
    the = vectors.matrix[vectors.index["the"]]
    assert torch.allclose(the[:3], torch.tensor([0.418, 0.24968, -0.41242]))
    assert torch.equal(vectors.matrix[vectors.zero_row], torch.zeros(50))


class _RunsCode:
    """What a crafted pickle does: call a function of the attacker's choosing when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_kv_file_is_refused_unless_trusted(tmp_path, tiny_vectors):
    import pickle

    from gensim.models import KeyedVectors

    from framework.errors import LayerprobeError
    from plugins.glove import GloveEncoder, GloveOptions

    crafted, marker = tmp_path / "crafted.kv", tmp_path / "code-ran"
    crafted.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(LayerprobeError, match="is a pickled gensim file, and loading a pickle can run code"):
        GloveEncoder(GloveOptions(vectors=str(crafted)))
    assert not marker.exists()

    genuine = tmp_path / "genuine.kv"
    KeyedVectors.load_word2vec_format(str(tiny_vectors), no_header=True).save(str(genuine))
    trusted = GloveEncoder(GloveOptions(vectors=str(genuine), trust_pickle=True))
    assert trusted.vectors.matrix.shape == (len(WORDS) + 1, 8)


def test_npy_vectors_with_a_vocabulary_file(tmp_path):
    import numpy as np

    from framework.errors import LayerprobeError
    from plugins.glove import GloveEncoder, GloveOptions

    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "v.npy", matrix)
    (tmp_path / "words.txt").write_text("cat\ndog\nmat\n", encoding="utf-8")
    encoder = GloveEncoder(GloveOptions(vectors=str(tmp_path / "v.npy"), vocabulary=str(tmp_path / "words.txt")))
    (batch,) = encoder.encode(["dog mat"], encoder.resolve_layer(None))
    assert batch.states[0].tolist() == [matrix[1].tolist(), matrix[2].tolist()]
    with pytest.raises(LayerprobeError, match="set encoder.vocabulary"):
        GloveEncoder(GloveOptions(vectors=str(tmp_path / "v.npy")))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LayerprobeError, match="not a plain numeric .npy matrix"):
        GloveEncoder(GloveOptions(vectors=str(tmp_path / "objects.npy"), vocabulary=str(tmp_path / "words.txt"))).vectors
