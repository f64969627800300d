"""Tokenizers: one small interface over sentencepiece (Llama 2, Mistral, TinyLlama, stories) and
tiktoken (Llama 3, and any GPT-2-style byte-level BPE such as SmolLM2's); the `tokenizers` library
only as a fallback for a vocabulary tiktoken cannot reproduce exactly.

A converted checkpoint directory holds either `tokenizer.model` (a sentencepiece protobuf) or
`tokenizer.tiktoken` (base64 token, rank per line), plus `tokenizer_config.json` with the special
tokens, the pre-tokenizer pattern, and whether a BOS token is prepended; and, if the model has
one, `chat_template.jinja`. Text as tokens come: `StreamDecoder` never shows half a UTF-8 character, and
`TextStream` (the server's) also holds back what may be the start of a stop string.
"""
import base64
import functools
import json
import os
import re
import unicodedata
from datetime import datetime
from pathlib import Path

# Pre-tokenizer patterns: text is split by the pattern first, then each piece is BPE-merged.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2: Llama 3's regex with single digits
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Mistral NeMo's "tekken": words split at case changes (camelCase -> camel, Case), single digits
TEKKEN_PATTERN = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
                  r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
                  r"""|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# SmolLM2 (StarCoder-style): Hugging Face first isolates every digit, then applies the GPT-2 regex to
# what lies between. As one regex: digits alone, and a whitespace run before a digit kept whole
# (it ends a piece in the two-step version, so `\s+(?!\S)` takes all of it there).
DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""

# Tokens that end a turn or a document, stopping generation wherever the tokenizer has them.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>", "</s>")

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Llama 2 chat: a system prompt folds into the first user turn; each exchange is <s>[INST] ... [/INST] ... </s>
LLAMA2_TEMPLATE = ("{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
                   "{% for m in messages if m['role'] != 'system' %}"
                   "{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
                   "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
                   "{{ m['content'] | trim }} [/INST]{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
                   "{% endfor %}")


class Tokenizer:
    """What generate.py needs of a tokenizer, whatever the backend."""

    def __init__(self, config: dict, special_tokens: dict, chat_template):
        self.special_tokens = special_tokens  # text -> id
        self.bos_id = special_tokens.get(config.get("bos_token"))
        self.eos_id = special_tokens.get(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
        self.stop_ids = sorted({self.eos_id} - {None} | {special_tokens[t] for t in END_TOKENS if t in special_tokens})
        self.chat_template = chat_template or self._default_chat_template()
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, sorted(special_tokens, key=len)[::-1])) + ")")

    def split_special(self, text: str):
        """text as (piece, None) runs of plain text and (token, id) for each special token written in it."""
        for piece in self._special_pattern.split(text) if self.special_tokens else [text]:
            if piece in self.special_tokens:
                yield piece, self.special_tokens[piece]
            elif piece:
                yield piece, None

    def encode(self, text: str, bos=None) -> list:
        """Token ids of text; special tokens written in the text (as a chat template writes them)
        become their ids. A BOS id is prepended when the tokenizer's config says so, unless bos says otherwise."""
        ids = self._encode(text)
        bos = self.add_bos if bos is None else bos
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def _default_chat_template(self):
        if "<|im_start|>" in self.special_tokens:
            return CHATML_TEMPLATE
        if "<|start_header_id|>" in self.special_tokens:
            return LLAMA3_TEMPLATE
        return LLAMA2_TEMPLATE

    def render_chat(self, messages, add_generation_prompt=True, tools=None) -> str:
        """The model's chat template applied to [{"role": ..., "content": ...}, ...] (assistant turns may carry
        "tool_calls", as transformers passes them) and, where given, the tools' function specs ([{"type":
        "function", "function": {...}}])."""
        names = {id_: text for text, id_ in self.special_tokens.items()}
        return self.compiled_chat_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=names.get(self.bos_id, ""), eos_token=names.get(self.eos_id, ""))

    @functools.cached_property
    def compiled_chat_template(self):
        """The chat template, compiled once (a server renders it for every chat request)."""
        return self.chat_environment().from_string(self.chat_template)

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the chat template reads a list of tools."""
        from jinja2 import meta

        return "tools" in meta.find_undeclared_variables(self.chat_environment().parse(self.chat_template))

    @staticmethod
    def chat_environment():
        """A sandbox for chat templates, as transformers renders them: its raise_exception, strftime_now and
        tojson (plain JSON, not HTML-escaped as Jinja's own), loop controls."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"])
        environment.filters["tojson"] = tojson
        environment.globals.update(raise_exception=raise_exception,
                                   strftime_now=lambda format: datetime.now().strftime(format))
        return environment


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file, config: dict, chat_template=None):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        special = {self.processor.id_to_piece(i): i for i in range(self.processor.get_piece_size())
                   if self.processor.is_control(i) or self.processor.is_unknown(i)}
        special.update(config.get("special_tokens", {}))
        # sentencepiece's ids are -1 where its model names no such piece (of type control)
        bos_id, eos_id = self.processor.bos_id(), self.processor.eos_id()
        if eos_id < 0 and "eos_token" not in config:
            raise ValueError(f"{model_file} names no end-of-text piece (sentencepiece's eos is not a control "
                             "piece): convert the checkpoint again")
        config = {**({"bos_token": self.processor.id_to_piece(bos_id)} if bos_id >= 0 else {}),
                  **({"eos_token": self.processor.id_to_piece(eos_id)} if eos_id >= 0 else {}),
                  "add_bos_token": True, **config}
        super().__init__(config, special, chat_template)

    def _encode(self, text):
        # sentencepiece does not parse special tokens in text, so they are split out first
        return [i for piece, id_ in self.split_special(text)
                for i in ([id_] if id_ is not None else self.processor.encode(piece))]

    def decode(self, ids) -> str:
        return self.processor.decode(list(ids))

    @property
    def vocab_size(self):
        return self.processor.get_piece_size()

    def token_bytes(self) -> list:
        """The bytes of each piece: "▁" is a space, a byte-fallback piece <0xNN> is that byte."""
        return [bytes([int(piece[3:5], 16)]) if self.processor.is_byte(id_) else piece.replace("▁", " ").encode()
                for id_, piece in enumerate(map(self.processor.id_to_piece, range(self.vocab_size)))]


class TiktokenTokenizer(Tokenizer):
    def __init__(self, ranks_file, config: dict, chat_template=None):
        import tiktoken

        ranks = load_ranks(ranks_file)
        special = {text: int(id_) for text, id_ in config.get("special_tokens", {}).items()}
        self.encoding = tiktoken.Encoding(
            name=Path(ranks_file).parent.name, pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens=special)
        self.token_ids = set(ranks.values()) | set(special.values())  # a vocabulary may leave ids unnamed
        self.normalization = config.get("normalizer")  # "NFC" for Qwen2's vocabulary, else None
        super().__init__(config, special, chat_template)

    def _encode(self, text):
        if self.normalization is None:
            return self.encoding.encode(text, allowed_special="all")
        # the text between special tokens is normalized (Unicode NFC), as the tokenizers library does it
        ids = []
        for piece, id_ in self.split_special(text):
            if id_ is not None:
                ids.append(id_)
            else:
                ids += self.encoding.encode_ordinary(unicodedata.normalize(self.normalization, piece))
        return ids

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    @property
    def vocab_size(self):
        return self.encoding.n_vocab

    def token_bytes(self) -> list:
        """The bytes of each token id (none for an id that names no token)."""
        return [self.encoding.decode_single_token_bytes(id_) if id_ in self.token_ids else b""
                for id_ in range(self.vocab_size)]


class TokenizersLibraryTokenizer(Tokenizer):
    """The fallback for a tokenizer.json whose pre-tokenizer no single tiktoken regex reproduces:
    run it with the `tokenizers` library itself rather than approximate it."""

    def __init__(self, json_file, config: dict, chat_template=None):
        try:
            from tokenizers import Tokenizer as LibraryTokenizer
        except ImportError:
            raise ValueError(f"{json_file} needs the tokenizers package: pip install tokenizers") from None
        self.library_tokenizer = LibraryTokenizer.from_file(str(json_file))
        special = {text: int(id_) for text, id_ in config.get("special_tokens", {}).items()}
        super().__init__(config, special, chat_template)

    def _encode(self, text):
        return self.library_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.library_tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self):
        return self.library_tokenizer.get_vocab_size()

    def token_bytes(self) -> list:
        """The bytes of each token id: a byte-level vocabulary's tokens are written in GPT-2's byte alphabet; a
        sentencepiece-style one's with "▁" for a space and <0xNN> for a byte."""
        pieces = {id_: piece for piece, id_ in self.library_tokenizer.get_vocab(with_added_tokens=True).items()}
        alphabet, special = byte_level_alphabet(), set(self.special_tokens.values())
        byte_level = all(char in alphabet for id_, piece in pieces.items() if id_ not in special for char in piece)

        def to_bytes(id_, piece):
            if id_ in special:
                return piece.encode()
            if byte_level:
                return bytes(alphabet[char] for char in piece)
            if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("▁", " ").encode()
        return [to_bytes(id_, pieces[id_]) if id_ in pieces else b"" for id_ in range(self.vocab_size)]


def load_tokenizer(checkpoint_dir) -> Tokenizer:
    directory = Path(checkpoint_dir)
    directory = directory if directory.is_dir() else directory.parent
    config_file, template_file = directory / "tokenizer_config.json", directory / "chat_template.jinja"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    chat_template = template_file.read_text() if template_file.is_file() else None
    if (directory / "tokenizer.tiktoken").is_file():
        if "pattern" not in config:
            raise ValueError(f"{config_file} has no pre-tokenizer 'pattern': re-convert the checkpoint")
        return TiktokenTokenizer(directory / "tokenizer.tiktoken", config, chat_template)
    if (directory / "tokenizer.model").is_file():
        return SentencePieceTokenizer(directory / "tokenizer.model", config, chat_template)
    if (directory / "tokenizer.json").is_file():
        return TokenizersLibraryTokenizer(directory / "tokenizer.json", config, chat_template)
    raise FileNotFoundError(f"no tokenizer.model, tokenizer.tiktoken or tokenizer.json in {directory}: "
                            "convert the checkpoint with scripts/")


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back a multi-byte UTF-8 character until all
    of its bytes have come (byte-level BPE often splits one character over several tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.window, self.offset = [], 0

    def push(self, token_id: int) -> str:
        self.window.append(token_id)
        text = self.tokenizer.decode(self.window)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the rest of its bytes
            return ""
        new_text = text[self.offset:]
        # keep the last token as context: sentencepiece decodes a leading space differently at the start
        self.window = self.window[-1:]
        self.offset = len(self.tokenizer.decode(self.window))
        return new_text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.window)[self.offset:]
        self.window, self.offset = [], 0
        return text


class TextStream:
    """A request's tokens as text, piece by piece: never half a UTF-8 character, and never text that might
    still turn out to be the start of one of the stop strings (held back until it cannot). `push` returns the
    text that is safe to show; `stopped` says a stop string was met (it and what follows are never shown)."""

    def __init__(self, tokenizer: Tokenizer, stop: list):
        self.decoder, self.stop = StreamDecoder(tokenizer), [s for s in stop if s]
        self.pending, self.stopped = "", False

    def push(self, token_id: int) -> str:
        return self.release(self.pending + self.decoder.push(token_id))

    def flush(self) -> str:
        """What is held back, once no more tokens will come."""
        text = self.release(self.pending + self.decoder.flush())
        text, self.pending = text + self.pending, ""
        return text

    def release(self, text: str) -> str:
        if self.stopped:
            return ""
        found = [text.index(stop) for stop in self.stop if stop in text]
        if found:
            self.stopped, self.pending = True, ""
            return text[:min(found)]
        held = unfinished_marker(text, self.stop)
        self.pending = text[len(text) - held:]
        return text[:len(text) - held]


def unfinished_marker(text: str, markers: list) -> int:
    """The length of the longest tail of text that begins one of the markers (0 if none does): what a stream
    holds back until the next piece says whether the marker follows."""
    return max((n for marker in markers for n in range(1, len(marker)) if text.endswith(marker[:n])), default=0)


def byte_level_alphabet() -> dict:
    """GPT-2's map from the printable characters used in byte-level BPE vocabularies back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def byte_level_ranks(vocab: dict, merges: list, special_tokens: dict) -> dict:
    """A tiktoken ranks table (token bytes -> id) from a byte-level BPE vocabulary and merge list.
    tiktoken merges the pair whose result has the lowest rank, and ranks are ids, so it equals the
    merge-list BPE only if merging in id order is merging in merge-list order: checked here."""
    to_byte = byte_level_alphabet()
    ranks = {bytes(to_byte[c] for c in token): id_ for token, id_ in vocab.items() if token not in special_tokens}
    last_id = -1
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged_id = vocab[left + right]
        if merged_id < last_id:
            raise ValueError("this vocabulary's merge order differs from its id order; tiktoken cannot reproduce it")
        last_id = merged_id
    return ranks


def save_tiktoken(out_dir, ranks: dict, config: dict):
    """Write tokenizer.tiktoken and tokenizer_config.json (config: pattern, special_tokens, bos_token,
    eos_token, add_bos_token), each through a temporary name so no half-written file is left."""
    out_dir = Path(out_dir)
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank]
    write_atomic(out_dir / "tokenizer.tiktoken", "".join(lines))
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def load_ranks(path) -> dict:
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_atomic(path, text: str):
    temporary = Path(f"{path}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
