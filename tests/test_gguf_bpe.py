"""GGUF `gpt2` vocabularies with `tokenizer.ggml.pre` qwen2 and llama-bpe against the `tokenizers`
library (the reference: the pipeline of Qwen2's and Llama 3's tokenizer.json), and Qwen's and
Mistral's chat templates from the file against HF transformers' apply_chat_template.

llama.cpp's vocab test files for these models are not at hand, so the test builds each tokenizer
with `tokenizers`: the model's pre-tokenizer regex and byte-level mapping, a small BPE vocabulary
trained on mixed text, its special tokens after the vocabulary (as the real ones are), Llama 3's
ignore_merges; then writes it into a GGUF's tokenizer.ggml.* keys the way llama.cpp's converter
does (added special tokens as CONTROL) and checks that tpllama's ids are the library's ids on
tricky text: digits, contractions, CJK, emoji, whitespace runs, newlines, special tokens in text,
decomposed accents (Qwen2's tokenizer.json normalizes to NFC; llama.cpp does not).

The chat templates are written here in the shape of Qwen2.5's (ChatML, a default system message,
a tools block through tojson) and Mistral's ([INST] turns, BOS/EOS, alternation enforced with
raise_exception, the system message folded into the first user turn); the file carries them in
tokenizer.chat_template, and tpllama must render and encode them as transformers does.
"""
import json

import pytest

from tpllama.tokenizer import load_tokenizer_file

tokenizers = pytest.importorskip("tokenizers")

CONTROL, NORMAL = 3, 1
# the Split regexes of Qwen2's and Llama 3's tokenizer.json
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
STYLES = {
    # pre: (regex, ignore_merges, special tokens, eos, NFC normalizer)
    "qwen2": (QWEN2_REGEX, False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", True),
    "llama-bpe": (LLAMA3_REGEX, True, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                       "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", False),
}

TRICKY = [
    "Hello world", " Hello world", "Hello World!", "  two leading spaces", "trailing spaces   ",
    "3 33 333 3333 33333 333333 3333333 3.14159 1,000,000 12345678901234",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "我想在apple工作1314151天～ 日本語のテキスト 한국어",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👍🏽",
    "\n", "\n\n\n", " \n \n\n \t \t\t \t\n  \n   \n    \n     \n", "a\r\nb\rc", "tab\there\t\t",
    "''''''```````\"\"\"\"......!!!!!!?????? ------======= ...",
    "нещо на Български Ünïcödé àccents ½ under_score camelCase",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|endoftext|> <|eot_id|>after<|end_of_text|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "<|im_end",                      # not a whole special token
    "cafe\u0301 e\u0301te\u0301 A\u030angstro\u0308m",   # decomposed accents: Qwen2's tokenizer composes them (NFC)
]
CORPUS = TRICKY * 3 + [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "def main():\n    print('hello, world')\n    return 0\n" * 3,
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.5 42 and more words in English.",
]


QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- else %}{%- set system = 'You are Qwen, a helpful assistant.' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}"
    "{%- endfor %}{{- '\\n</tools>' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi  there "},
     {"role": "assistant", "content": " Bonjour ! "}, {"role": "user", "content": "Ça va? 3 + 33 = 36\n\nok"}],
]


def build(pre: str, specials=None):
    """The reference `tokenizers.Tokenizer` of a style: trained BPE + the model's pre-tokenizer
    (specials: other special tokens than the style's)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    regex, ignore_merges, style_specials, _, nfc = STYLES[pre]
    specials = style_specials if specials is None else specials
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    state = json.loads(tok.to_str())
    state["model"]["ignore_merges"] = ignore_merges
    tok = Tokenizer.from_str(json.dumps(state))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def write_gguf(path, tok, pre: str, specials=None, eos=None, bos=None, template=None):
    """A vocab-only GGUF with the tokenizer.ggml.* keys of llama.cpp's converter (_set_vocab_gpt2)."""
    import gguf
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    specials = set(STYLES[pre][2] if specials is None else specials)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if t in specials else NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab[eos or STYLES[pre][3]])
    if bos:
        w.add_bos_token_id(vocab[bos])
        w.add_add_bos_token(False)      # the template writes it
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=sorted(STYLES))
def pair(request, tmp_path_factory):
    """(pre, reference tokenizer, tpllama's tokenizer of the GGUF written from it)."""
    ref = build(request.param)
    path = write_gguf(tmp_path_factory.mktemp("bpe") / f"{request.param}.gguf", ref, request.param)
    return request.param, ref, load_tokenizer_file(str(path))


def reference_ids(ref, text: str, parse_special: bool):
    ref.encode_special_tokens = not parse_special
    try:
        return ref.encode(text, add_special_tokens=False).ids
    finally:
        ref.encode_special_tokens = False


@pytest.mark.parametrize("parse_special", [True, False])
def test_ids_match_tokenizers(pair, parse_special):
    pre, ref, ours = pair
    for text in TRICKY:
        want = reference_ids(ref, text, parse_special)
        assert ours.encode(text, add_bos=False, parse_special=parse_special) == want, (pre, text)
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=True), (pre, text)


def test_digits_are_grouped_as_the_model_groups_them(pair):
    """Qwen2 splits numbers into single digits, Llama 3 into runs of up to three (the one regex difference)."""
    pre, ref, ours = pair
    pieces = [ours.decode([i]) for i in ours.encode("1234567", add_bos=False)]
    assert pieces == (["1", "2", "3", "4", "5", "6", "7"] if pre == "qwen2" else ["123", "456", "7"])
    assert ours.encode("1234567", add_bos=False) == reference_ids(ref, "1234567", True)


def test_end_of_turn_tokens_stop(pair):
    """eos from tokenizer.ggml.eos_token_id, and every end-of-turn special token of the vocabulary."""
    pre, ref, ours = pair
    vocab = ref.get_vocab(with_added_tokens=True)
    assert ours.eos_id == vocab[STYLES[pre][3]]
    ends = {"qwen2": ("<|im_end|>", "<|endoftext|>"), "llama-bpe": ("<|eot_id|>", "<|end_of_text|>")}[pre]
    assert {vocab[t] for t in ends} <= set(ours.eos_ids)
    assert vocab["<|im_start|>" if pre == "qwen2" else "<|start_header_id|>"] not in ours.eos_ids


def hf_tokenizer(ref, template, **special_tokens):
    """transformers' tokenizer over the reference pipeline, with the chat template."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ref, **special_tokens)
    hf.chat_template = template
    return hf


def assert_chats_match(ours, hf, **extra):
    for messages in CHATS:
        for prompt in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **extra)
            assert ours.render_chat(messages, add_generation_prompt=prompt, **extra) == want, (messages, prompt)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, **extra)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ours.encode_chat(messages, add_generation_prompt=prompt, **extra) == list(ids), (messages, prompt)


def test_qwen_chat_template_from_the_file_renders_like_transformers(tmp_path):
    ref = build("qwen2")
    path = write_gguf(tmp_path / "qwen.gguf", ref, "qwen2", template=QWEN_TEMPLATE)
    ours = load_tokenizer_file(str(path))
    assert ours.chat_template == QWEN_TEMPLATE
    hf = hf_tokenizer(ref, QWEN_TEMPLATE, eos_token="<|im_end|>")
    assert_chats_match(ours, hf)
    assert_chats_match(ours, hf, tools=[{"name": "météo", "parameters": {"city": {"type": "string"}}}])
    assert ours.render_chat(CHATS[0]).startswith("<|im_start|>system\nYou are Qwen")


def test_mistral_chat_template_from_the_file_renders_like_transformers(tmp_path):
    specials = ["<unk>", "<s>", "</s>"]
    ref = build("llama-bpe", specials)
    path = write_gguf(tmp_path / "mistral.gguf", ref, "llama-bpe", specials, eos="</s>", bos="<s>",
                      template=MISTRAL_TEMPLATE)
    ours = load_tokenizer_file(str(path))
    hf = hf_tokenizer(ref, MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert_chats_match(ours, hf)
    assert ours.render_chat(CHATS[1]).startswith("<s>[INST] Answer in French.\n\nHi  there [/INST] Bonjour !</s>")
    from tpllama.tokenizer import ChatTemplateError
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.render_chat([{"role": "assistant", "content": "first"}])


def _gpt2_bytes_to_unicode():
    """GPT-2's encoder.py bytes_to_unicode, as published (the reference for byte-level vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_byte_level_pieces_of_a_whole_vocabulary_are_gpt2s_bytes():
    from tpllama.tokenizer.bpe import bytelevel_pieces
    char_to_byte = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
    every_byte = [_gpt2_bytes_to_unicode()[b] for b in range(256)]
    tokens = every_byte + ["Ġthe", "ĠĠ", "", "âĢĶ", "Ċ", "ĉ", "<|im_start|>", "".join(every_byte)]
    want = [bytes(char_to_byte[c] for c in t) for t in tokens]
    assert bytelevel_pieces(tokens) == want
    # a character outside the byte map (a raw special token's text) stays UTF-8, the others still map
    assert bytelevel_pieces(tokens + ["<｜end｜>"]) == want + ["<｜end｜>".encode("utf-8")]
