"""SentencePiece ("llama") GGUF vocabularies, checked against the sentencepiece library itself.

A tiny BPE model is trained with sentencepiece, written into a GGUF the way llama.cpp's converter does
(pieces, scores, token types; no merges), rebuilt by our importer, and compared token for token.
"""

from __future__ import annotations

import io
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from p2pinfer.gguf.reader import GGUFModel
from p2pinfer.gguf.tokenizer import build_tokenizer

WORDS = ("the quick brown fox jumps over lazy dog peer network model token inference verify honest node "
         "reward").split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[spm.SentencePieceProcessor, Tokenizer, list[str]]:
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + str(rng.choice([".", "!", "?", ","]))
             for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, split_digits=True,
        user_defined_symbols=["<tool>"], character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if tokens[i] == "<tool>" else 1 for i in range(sp.vocab_size())]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files = build_tokenizer(GGUFModel(path))
    assert (files.bos_token, files.eos_token, files.unk_token, files.add_bos_token) == ("<s>", "</s>", "<unk>", True)
    return sp, Tokenizer.from_str(files.tokenizer_json), lines


TEXTS = ["Hello wörld! 12345 ☃ and a fox 🦊", "  leading spaces", "trailing  ", "a\nb\tc", "", " ",
         "quick  brown   fox", "the lazy dog verifies honest nodes"]


def test_ids_equal_sentencepiece(trained) -> None:
    sp, tok, lines = trained
    for text in lines[:200] + TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == sp.decode(sp.encode(text))


def test_bos_and_added_tokens(trained) -> None:
    sp, tok, _ = trained
    assert tok.encode("the fox").ids == [sp.bos_id()] + sp.encode("the fox")
    # Control tokens in text stay whole. After an added token, llama.cpp (and transformers' GGUF
    # conversion) start a new fragment with the space prefix; plain sentencepiece would not.
    ids = tok.encode("<s>the<tool>fox", add_special_tokens=False).ids
    assert ids == [sp.bos_id()] + sp.encode("the") + [sp.piece_to_id("<tool>")] + sp.encode("fox")


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("thequickbrownfoxlazydg .,!?\n\t 0123456789") + ["ü", "☃", "🦊"]),
                    max_size=60))
def test_ids_equal_sentencepiece_on_arbitrary_text(trained, text: str) -> None:
    sp, tok, _ = trained
    assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)
