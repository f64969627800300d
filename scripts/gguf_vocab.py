"""A GGUF file's tokenizer rebuilt as files brisk's tokenizer.py loads.

GGUF stores a vocabulary as lists (tokens, scores, token types, merges) and names the pre-tokenizer
(`tokenizer.ggml.pre`) that llama.cpp applies before BPE, without the pre-tokenizer itself. So:

    'llama' (sentencepiece)  -> tokenizer.model, a sentencepiece protobuf written from the lists
    'gpt2' (byte-level BPE)  -> tokenizer.tiktoken + the pre-tokenizer as one regex, where one regex
                                reproduces it; else tokenizer.json with the pre-tokenizer's sequence of
                                splits, run by the `tokenizers` library (DeepSeek's vocabularies)

The pre-tokenizers are those of the models' own tokenizer.json files, which llama.cpp's
`llama-vocab.cpp` reproduces for each name.
"""
import json
import os
import struct
import sys
from pathlib import Path

from cli import UsageError
from tokenizer import (DIGITS_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, TEKKEN_PATTERN,
                       byte_level_ranks, save_tiktoken, write_atomic)

# llama.cpp's name for a byte-level BPE pre-tokenizer -> the one regex that reproduces it
PRE_TOKENIZER_PATTERNS = {
    **dict.fromkeys(["gpt-2", "default", "olmo", "phi-2", "mpt"], GPT2_PATTERN),
    # digits isolated one by one, then GPT-2's regex (StarCoder's tokenizer and its descendants)
    **dict.fromkeys(["starcoder", "smollm", "refact", "command-r", "codeshell", "minerva-7b"], DIGITS_PATTERN),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral"], LLAMA3_PATTERN),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], QWEN2_PATTERN),
    "tekken": TEKKEN_PATTERN,  # Mistral NeMo
}
# Vocabularies whose text is Unicode NFC-normalized before it is split (Qwen2's tokenizer.json)
NFC_PRE_TOKENIZERS = {"qwen2", "deepseek-r1-qwen"}

# DeepSeek's pre-tokenizers split the text by one regex after another, each isolating its matches
# within the pieces the previous ones left; no single regex does that, so these run in `tokenizers`.
# (Greek Extended and letterlike symbols written as escapes: their NFC forms are other characters)
DEEPSEEK_LETTERS = ("A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚ"
                    "Ḁ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝ\u1f5f-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌ\u1fd0-\u1fd3\u1fd6-\u1fdbῠ-Ῥῲ-ῴῶ-ῼ"
                    "ℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄ"
                    "Ⰰ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃")
PRE_TOKENIZER_SPLITS = {
    "deepseek-llm": [r"[\r\n]", rf"\s?[{DEEPSEEK_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
                     r"[一-龥ࠀ-一가-퟿]+", r"\p{N}+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""],
}
# GGUF token types (sentencepiece's numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def field(reader, key, default=None):
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def protobuf_field(number: int, value) -> bytes:
    """One field of protobuf's wire format: ints and bools as varints, floats as fixed32, bytes and
    nested messages length-delimited."""
    def varint(n):
        n &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return varint(number << 3) + varint(int(value))
    return varint(number << 3 | 2) + varint(len(value)) + value


def sentencepiece_model(reader) -> bytes:
    """A sentencepiece ModelProto (sentencepiece_model.proto) rebuilt from a GGUF's 'llama' vocabulary:
    pieces with their scores and types (GGUF uses sentencepiece's type numbers), a BPE trainer spec with
    byte fallback, and Llama's normalizer (no normalisation, spaces as U+2581, a leading space added)."""
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    unknown_id = field(reader, "tokenizer.ggml.unknown_token_id", 0)
    special_ids = [unknown_id] + [field(reader, f"tokenizer.ggml.{name}_token_id", -1)
                                  for name in ("bos", "eos", "padding")]
    # sentencepiece wants exactly one UNKNOWN piece, the unknown token ("unk is already defined"), and finds
    # it, bos, eos and padding by the pieces the trainer spec names, of types UNKNOWN and CONTROL. llama.cpp's
    # Phi-3 vocabulary types its <unk> CONTROL and its padding pieces UNKNOWN, and its eos is not "</s>":
    # the unknown token is written UNKNOWN, the other UNKNOWN pieces as the unused pieces they are, and the
    # special pieces by name.
    types = [UNKNOWN if id_ == unknown_id else UNUSED if kind == UNKNOWN else kind
             for id_, kind in enumerate(field(reader, "tokenizer.ggml.token_type"))]
    pieces = b"".join(protobuf_field(1, protobuf_field(1, token.encode()) + protobuf_field(2, float(score))
                                     + protobuf_field(3, int(kind)))
                      for token, score, kind in zip(tokens, scores, types))
    trainer = b"".join([
        protobuf_field(3, 2), protobuf_field(4, len(tokens)), protobuf_field(35, True),  # BPE, vocab size, bytes
        *(protobuf_field(40 + i, id_) for i, id_ in enumerate(special_ids)),  # unk_id, bos_id, eos_id, pad_id
        *(protobuf_field(45 + i, tokens[id_].encode())  # unk_piece, bos_piece, eos_piece, pad_piece
          for i, id_ in enumerate(special_ids) if 0 <= id_ < len(tokens))])
    normalizer = b"".join([
        protobuf_field(1, b"identity"), protobuf_field(3, bool(field(reader, "tokenizer.ggml.add_space_prefix", True))),
        protobuf_field(4, False), protobuf_field(5, True)])
    return pieces + protobuf_field(2, trainer) + protobuf_field(3, normalizer)


def tokenizer_files(reader, out_dir: Path):
    kind = field(reader, "tokenizer.ggml.model")
    if kind == "llama":
        temporary = out_dir / "tokenizer.model.tmp"
        temporary.write_bytes(sentencepiece_model(reader))
        os.replace(temporary, out_dir / "tokenizer.model")
        write_atomic(out_dir / "tokenizer_config.json", json.dumps(
            {"add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", True))}, indent=2))
    elif kind != "gpt2":
        raise UsageError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE and "
                         "'llama' sentencepiece): convert the Hugging Face directory instead")
    else:
        byte_level_tokenizer(reader, out_dir)
    chat_template = field(reader, "tokenizer.chat_template")
    if chat_template:
        write_atomic(out_dir / "chat_template.jinja", chat_template)


def byte_level_tokenizer(reader, out_dir: Path):
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_PATTERNS and pre not in PRE_TOKENIZER_SPLITS:
        known = sorted([*PRE_TOKENIZER_PATTERNS, *PRE_TOKENIZER_SPLITS])
        raise UsageError(f"GGUF pre-tokenizer {pre!r} is not known; known: {', '.join(known)}")
    tokens, merges = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges") or []
    token_types = field(reader, "tokenizer.ggml.token_type")
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    # control and user-defined tokens are matched whole in text, never BPE-merged
    special = {token: id_ for id_, (token, kind) in enumerate(zip(tokens, token_types))
               if kind in (CONTROL, USER_DEFINED)}
    config = {
        "special_tokens": special,
        "bos_token": None if bos is None else tokens[bos],
        "eos_token": None if eos is None else tokens[eos],
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
    }
    normalizer = "NFC" if pre in NFC_PRE_TOKENIZERS else None
    if pre in PRE_TOKENIZER_PATTERNS:
        try:
            ranks = byte_level_ranks({token: id_ for id_, token in enumerate(tokens)}, merges, special)
            save_tiktoken(out_dir, ranks, {"pattern": PRE_TOKENIZER_PATTERNS[pre],
                                           **({"normalizer": normalizer} if normalizer else {}), **config})
            return
        except ValueError as error:
            print(f"note: {error}; writing tokenizer.json for the tokenizers library", file=sys.stderr)
    splits = PRE_TOKENIZER_SPLITS.get(pre) or [PRE_TOKENIZER_PATTERNS[pre]]
    write_atomic(out_dir / "tokenizer.json", json.dumps(
        tokenizer_json(tokens, merges, special, splits, normalizer), ensure_ascii=False))
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def tokenizer_json(tokens: list, merges: list, special: dict, splits: list, normalizer=None) -> dict:
    """A `tokenizers` library tokenizer.json: byte-level BPE after an isolating split by each regex in
    turn, the special tokens matched whole first."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": id_, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for token, id_ in special.items()],
        "normalizer": {"type": normalizer} if normalizer else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False}
              for split in splits),
            {"type": "ByteLevel", **byte_level}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: id_ for id_, token in enumerate(tokens)}, "merges": list(merges)},
    }
