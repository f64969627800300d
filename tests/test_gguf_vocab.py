"""GGUF vocabularies of every Llama-architecture family convert to tokenizers that give the ids of the
`tokenizers` library with each model's own pre-tokenizer (as its published tokenizer.json has it), and
sentencepiece vocabularies with user-defined, control and extra unknown pieces load and encode exactly."""
import json

import pytest

from conftest import HARD_CASES, shared_text, split_then_byte_level, train_byte_level_bpe
from scripts.gguf_vocab import PRE_TOKENIZER_SPLITS, tokenizer_files
from tokenizer import QWEN2_PATTERN, TEKKEN_PATTERN, load_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_vocab_gguf(path, reference, pre: str, add_bos=False):
    """A vocabulary-only GGUF of a byte-level BPE tokenizer, as llama.cpp's converter writes one."""
    from gguf import GGUFWriter

    model = json.loads(reference.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2"), writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens), writer.add_token_merges(merges)
    writer.add_token_types([3 if token in SPECIAL else 1 for token in tokens])
    writer.add_bos_token_id(model["vocab"]["<|im_start|>"]), writer.add_eos_token_id(model["vocab"]["<|im_end|>"])
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.close()


def converted_vocab(tmp_path, reference, pre: str):
    from gguf import GGUFReader

    write_vocab_gguf(tmp_path / "vocab.gguf", reference, pre)
    out = tmp_path / "out"
    out.mkdir()
    tokenizer_files(GGUFReader(tmp_path / "vocab.gguf"), out)
    return out


def gpt2_byte_level():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def digits_then_byte_level(individual: bool):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=individual),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])


def deepseek(pre: str):
    """DeepSeek's tokenizer.json: isolating splits one after another; DeepSeek LLM and Coder end with a
    digits step (runs, or single digits), DeepSeek V3 splits digit groups by regex first."""
    from tokenizers import Regex, pre_tokenizers

    regexes = PRE_TOKENIZER_SPLITS[pre]
    steps = [pre_tokenizers.Split(Regex(regex), behavior="isolated")
             for regex in (regexes if pre == "deepseek-v3" else regexes[:-1])]
    if pre != "deepseek-v3":
        steps.append(pre_tokenizers.Digits(individual_digits=pre == "deepseek-coder"))
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# llama.cpp's name -> the pre-tokenizer of that family's published tokenizer.json (and a normalizer)
FAMILIES = {
    "olmo": gpt2_byte_level,
    "refact": lambda: digits_then_byte_level(True),
    "command-r": lambda: digits_then_byte_level(True),
    "qwen2": lambda: split_then_byte_level(QWEN2_PATTERN),
    "tekken": lambda: split_then_byte_level(TEKKEN_PATTERN),
    "deepseek-llm": lambda: deepseek("deepseek-llm"),
    "deepseek-coder": lambda: deepseek("deepseek-coder"),
    "deepseek-v3": lambda: deepseek("deepseek-v3"),
}


def reference_for(pre: str):
    from tokenizers import normalizers

    reference = train_byte_level_bpe(400, SPECIAL)
    reference.pre_tokenizer = FAMILIES[pre]()
    if pre == "qwen2":
        reference.normalizer = normalizers.NFC()
    return reference


@pytest.mark.parametrize("pre", list(FAMILIES))
def test_gguf_vocabulary_gives_the_ids_of_its_familys_pre_tokenizer(pre, tmp_path):
    reference = reference_for(pre)
    ours = load_tokenizer(converted_vocab(tmp_path, reference, pre))
    lines = (HARD_CASES + shared_text("wikitext-2-raw-test.txt").split("\n")
             + shared_text("tinyshakespeare.txt").split("\n"))
    expected = [encoding.ids for encoding in reference.encode_batch(lines)]
    differing = [line for line, ids in zip(lines, expected) if ours.encode(line) != ids]
    assert differing == []
    assert ours.decode(ours.encode(HARD_CASES[4])) == HARD_CASES[4]


@pytest.mark.parametrize("pre, kind", [("qwen2", "tokenizer.tiktoken"), ("tekken", "tokenizer.tiktoken"),
                                       ("deepseek-coder", "tokenizer.json")])
def test_one_regex_becomes_tiktoken_and_a_sequence_of_splits_stays_with_the_tokenizers_library(pre, kind, tmp_path):
    out = converted_vocab(tmp_path, reference_for(pre), pre)
    assert [path.name for path in out.glob("tokenizer.*")] == [kind]


def test_special_tokens_of_a_split_sequence_vocabulary_become_their_ids(tmp_path):
    reference = reference_for("deepseek-llm")
    ours = load_tokenizer(converted_vocab(tmp_path, reference, "deepseek-llm"))
    text = "<|im_start|>user\nhello 123<|im_end|>"
    assert ours.encode(text) == reference.encode(text).ids
    assert ours.encode(text)[0] == ours.special_tokens["<|im_start|>"] and ours.stop_ids == [0, 2]


def test_unknown_pre_tokenizer_is_refused_in_one_line(tmp_path):
    from cli import UsageError

    with pytest.raises(UsageError, match="GGUF pre-tokenizer 'no-such-model' is not known; known: .*deepseek-v3"):
        converted_vocab(tmp_path, train_byte_level_bpe(300, SPECIAL), "no-such-model")


@pytest.fixture(scope="module")
def phi3_like_gguf(tmp_path_factory):
    """A sentencepiece vocabulary typed as llama.cpp's Phi-3 GGUF types its pieces: <unk> (id 0) and <s>
    CONTROL, </s> (id 2) USER_DEFINED, an end-of-text piece <|endoftext|> after the trained ones, CONTROL,
    which is both eos and padding, then padding pieces typed UNKNOWN; and user-defined pieces (matched whole
    by sentencepiece) and control pieces (Mistral v0.3's [INST])."""
    import sentencepiece
    from gguf import GGUFWriter

    directory = tmp_path_factory.mktemp("phi3")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog", "hello world, how are you"] * 20),
        model_prefix=str(directory / "spm"), vocab_size=300, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|user|>", "<|assistant|>"], control_symbols=["[INST]", "[/INST]"])
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "spm.model"))
    user_defined = {processor.piece_to_id("<|user|>"), processor.piece_to_id("<|assistant|>"), processor.eos_id()}
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    types = [4 if i in user_defined else 3 if processor.is_unknown(i) or processor.is_control(i)
             else 1 + 5 * processor.is_byte(i) for i in range(len(pieces))]
    end_of_text = len(pieces)
    writer = GGUFWriter(directory / "phi3.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces + ["<|endoftext|>"] + [f"[PAD{i}]" for i in range(4)])
    writer.add_token_scores([processor.get_score(i) for i in range(len(pieces))] + [0.0] + [-10000.0] * 4)
    writer.add_token_types(types + [3] + [2] * 4)
    writer.add_bos_token_id(processor.bos_id()), writer.add_eos_token_id(end_of_text)
    writer.add_unk_token_id(processor.unk_id()), writer.add_pad_token_id(end_of_text)
    writer.add_add_bos_token(True)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.close()
    return directory / "phi3.gguf", processor


def test_sentencepiece_with_user_defined_control_and_padding_pieces_loads(phi3_like_gguf, tmp_path):
    from gguf import GGUFReader

    gguf_path, processor = phi3_like_gguf
    tokenizer_files(GGUFReader(gguf_path), tmp_path)
    ours = load_tokenizer(tmp_path)
    lines = ["<|user|>hello world<|assistant|> the fox", "how are<|user|>you"] + \
        shared_text("tinyshakespeare.txt").split("\n")[:2000]
    assert [ours.encode(line, bos=False) for line in lines] == [processor.encode(line) for line in lines]
    assert ours.vocab_size == processor.get_piece_size() + 5
    assert (ours.bos_id, ours.eos_id) == (processor.bos_id(), processor.get_piece_size())  # <s>, <|endoftext|>
    inst = processor.piece_to_id("[INST]")
    assert ours.encode("[INST]hello", bos=False) == [inst] + processor.encode("hello")
