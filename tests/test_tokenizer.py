"""brisk's tokenizers give exactly the ids of the `tokenizers` library, and stream text safely."""
import json

import pytest

from conftest import HARD_CASES, shared_text, split_then_byte_level, train_byte_level_bpe
from scripts.convert_hf_checkpoint import convert_tokenizer
from tokenizer import LLAMA3_PATTERN, QWEN2_PATTERN, StreamDecoder, byte_level_ranks, load_tokenizer


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.mark.parametrize("name", ["wikitext-2-raw-test.txt", "tinyshakespeare.txt"])
def test_smollm2_ids_equal_tokenizers_library_on_every_line(name, smollm2, smollm2_reference_tokenizer):
    lines = shared_text(name).split("\n")
    expected = [encoding.ids for encoding in smollm2_reference_tokenizer.encode_batch(lines)]
    differing = [line for line, ids in zip(lines, expected) if smollm2.encode(line) != ids]
    assert differing == []


@pytest.mark.parametrize("name", ["wikitext-2-raw-test.txt", "tinyshakespeare.txt"])
def test_smollm2_ids_equal_tokenizers_library_on_the_whole_file(name, smollm2, smollm2_reference_tokenizer):
    text = shared_text(name)
    assert smollm2.encode(text) == smollm2_reference_tokenizer.encode(text).ids


@pytest.mark.parametrize("text", ["abc  1", "x \n 5", "  12  34", "a\t\t9 b", "hello   2024!", "Ⅻ  ²3"])
def test_whitespace_run_before_a_digit_is_one_token_as_in_tokenizers(text, smollm2, smollm2_reference_tokenizer):
    # Hugging Face isolates digits before its byte-level regex, so a whitespace run before a digit ends a
    # piece and stays whole; the plain GPT-2 regex with single digits would split it.
    assert smollm2.encode(text) == smollm2_reference_tokenizer.encode(text).ids


def test_special_tokens_in_text_become_their_ids(smollm2, smollm2_reference_tokenizer):
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ids == smollm2_reference_tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids


def test_smollm2_does_not_prepend_bos_as_its_metadata_says(smollm2):
    assert smollm2.add_bos is False
    assert smollm2.encode("Hello") == [19556]
    assert smollm2.encode("Hello", bos=True) == [1, 19556]


def test_smollm2_stops_at_end_of_turn_and_end_of_text(smollm2):
    assert smollm2.stop_ids == [0, 2]


def test_token_bytes_spell_the_text_byte_for_byte(smollm2):
    """What structured output matches grammars against: each id's bytes, a character split over tokens
    included."""
    text = "Caf\u00e9 \U0001F600 costs 3,50 \u20ac"
    pieces = smollm2.token_bytes()
    assert len(pieces) == smollm2.vocab_size
    assert b"".join(pieces[id_] for id_ in smollm2.encode(text)) == text.encode()
    assert pieces[smollm2.special_tokens["<|im_end|>"]] == b"<|im_end|>"


def test_decode_inverts_encode(smollm2):
    text = "Naïve café — 東京 🚀 costs $3.50!\n\ttabs"
    assert smollm2.decode(smollm2.encode(text)) == text


def test_streaming_never_emits_a_broken_character(smollm2):
    text = "Emoji 🚀🎉, CJK 東京都, accents éàü, and math ∑∫ end."
    ids = smollm2.encode(text)
    assert len(ids) > len(text.split())  # several characters are split over more than one token
    stream = StreamDecoder(smollm2)
    pieces = [stream.push(token_id) for token_id in ids] + [stream.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_chatml_template_from_the_gguf(smollm2):
    rendered = smollm2.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_converted_tokenizer_json_equals_tokenizers_library(tiny_dir, tiny_hf_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json"))
    ours = load_tokenizer(tiny_dir)
    assert (tiny_dir / "tokenizer.tiktoken").is_file()
    lines = shared_text("tinyshakespeare.txt").split("\n")[:3000]
    assert [ours.encode(line) for line in lines] == [e.ids for e in reference.encode_batch(lines)]


def converted(reference, directory, tokenizer_config=None):
    """A tokenizers-library tokenizer saved as a Hugging Face directory's tokenizer.json (with its
    tokenizer_config.json, if given) and converted: the output directory."""
    source, out = directory / "source", directory / "out"
    source.mkdir(), out.mkdir()
    reference.save(str(source / "tokenizer.json"))
    if tokenizer_config:
        (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    convert_tokenizer(source, out)
    return out


def test_llama3_style_tokenizer_json_converts_to_tiktoken(tmp_path):
    reference = train_byte_level_bpe(400, ["<|begin_of_text|>", "<|eot_id|>"])
    reference.pre_tokenizer = split_then_byte_level(LLAMA3_PATTERN)
    ours = load_tokenizer(converted(reference, tmp_path, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                          "add_bos_token": True}))
    lines = shared_text("wikitext-2-raw-test.txt").split("\n")[:1000]
    assert [ours.encode(line, bos=False) for line in lines] == [e.ids for e in reference.encode_batch(lines)]
    assert ours.encode("hi")[0] == ours.bos_id == 0
    assert "<|start_header_id|>" not in ours.special_tokens and ours.stop_ids == [1]


def test_qwen2_style_tokenizer_json_with_nfc_converts_to_tiktoken(tmp_path):
    """Qwen2's vocabulary: NFC before a split-then-byte-level pre-tokenizer. The text between special tokens is
    normalized as the tokenizers library does it (composed accents, but not across a special token)."""
    from tokenizers import normalizers

    reference = train_byte_level_bpe(400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    reference.normalizer = normalizers.NFC()
    reference.pre_tokenizer = split_then_byte_level(QWEN2_PATTERN)
    out = converted(reference, tmp_path)
    assert (out / "tokenizer.tiktoken").is_file()
    ours = load_tokenizer(out)
    lines = HARD_CASES + shared_text("wikitext-2-raw-test.txt").split("\n")[:500]
    assert [ours.encode(line) for line in lines] == [e.ids for e in reference.encode_batch(lines)]
    assert ours.encode("e\u0301") == ours.encode("\u00e9") != ours.encode("e")


def test_unsupported_pre_tokenizer_falls_back_to_the_tokenizers_library(tmp_path):
    from tokenizers import pre_tokenizers


    reference = train_byte_level_bpe(300, ["<|endoftext|>"])
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    out = converted(reference, tmp_path)
    assert not (out / "tokenizer.tiktoken").exists() and (out / "tokenizer.json").is_file()
    text = "Hello, world... it's 12:30!"
    assert load_tokenizer(out).encode(text) == reference.encode(text).ids
    ours = load_tokenizer(out)
    pieces = ours.token_bytes()
    assert b"".join(pieces[id_] for id_ in ours.encode("caf\u00e9 \u00fcber")) == "caf\u00e9 \u00fcber".encode()


def test_merge_order_that_tiktoken_cannot_reproduce_is_refused():
    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4}
    with pytest.raises(ValueError, match="merge order differs"):
        byte_level_ranks(vocab, ["a b", "b c"], {})


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    import sentencepiece

    directory = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog", "hello world, how are you today"] * 20),
        model_prefix=str(directory / "tokenizer"), vocab_size=300, model_type="bpe", byte_fallback=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    return directory


def test_sentencepiece_prepends_bos_by_default(sentencepiece_dir):
    tokenizer = load_tokenizer(sentencepiece_dir)
    ids = tokenizer.encode("hello world")
    assert ids[0] == tokenizer.bos_id == 1
    assert tokenizer.decode(ids[1:]) == "hello world"
    assert tokenizer.stop_ids == [2]


def test_sentencepiece_token_bytes_spell_the_text_with_its_leading_space(sentencepiece_dir):
    """"\u2581" is a space and a character outside the vocabulary is spelled by byte-fallback pieces."""
    tokenizer = load_tokenizer(sentencepiece_dir)
    pieces = tokenizer.token_bytes()
    ids = tokenizer.encode("hello w\u00f6rld", bos=False)
    assert any(tokenizer.processor.is_byte(id_) for id_ in ids)
    assert b"".join(pieces[id_] for id_ in ids) == " hello w\u00f6rld".encode()


def test_sentencepiece_parses_special_tokens_in_text(sentencepiece_dir):
    tokenizer = load_tokenizer(sentencepiece_dir)
    ids = tokenizer.encode("<s>hello</s>", bos=False)
    assert ids[0] == 1 and ids[-1] == 2 and tokenizer.decode(ids[1:-1]) == "hello"


def test_a_sentencepiece_model_without_an_end_of_text_piece_is_refused_in_one_line(tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 20),
        model_prefix=str(tmp_path / "tokenizer"), vocab_size=300, model_type="bpe", byte_fallback=True,
        bos_id=1, eos_id=-1, unk_id=0, pad_id=-1)
    with pytest.raises(ValueError, match="tokenizer.model names no end-of-text piece"):
        load_tokenizer(tmp_path)


def test_llama2_chat_template_is_the_default_for_sentencepiece(sentencepiece_dir):
    tokenizer = load_tokenizer(sentencepiece_dir)
    rendered = tokenizer.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
    assert rendered == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"
