"""Tokenizer tests against independent references: llama.cpp's test vectors, the sentencepiece and
tokenizers libraries, HF transformers, and the known prompt ids of the shared models."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

from tpllama.errors import ModelFormatError
from tpllama.formats import open_model
from tpllama.tokenizer import ChatTemplateError, StreamDecoder, load_tokenizer, load_tokenizer_file

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_CHAT_HI = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

# strings for streaming and cross-checks: emoji (some split over byte tokens), CJK, leading spaces, newlines
STREAM_STRINGS = [
    "Once upon a time, there was a little girl named Lily.",
    "  two leading spaces",
    " one leading space",
    "emoji 🙂👍🏽 and 🦙!",
    "中文字符 日本語のテキスト 한국어",
    "line one\n\nline three\n",
    "\ttab and trailing space ",
    "digits 12345 and 3.14159",
    "Ünïcödé àccents ½",
]


def shared(rel: str) -> Path:
    path = MODELS / rel
    if not path.exists():
        pytest.skip(f"{path} not found: the shared test models (../shared/models next to the repository) are absent")
    return path


def vocab_vectors(name: str):
    """llama.cpp's test-tokenizer-0 vectors: the .inp strings are separated by lines
    '__ggml_vocab_test__' (the newline before the separator belongs to it); .out has one line of
    ids per string, generated without BOS."""
    inp = shared(f"vocab-tests/{name}.inp").read_text(encoding="utf-8")
    out = shared(f"vocab-tests/{name}.out").read_text(encoding="utf-8")
    strings = inp.split("\n__ggml_vocab_test__\n")
    assert strings[-1] == ""                     # the file ends with a separator
    strings = strings[:-1]
    expected = [[int(x) for x in line.split()] for line in out.split("\n")[:-1]]
    assert len(strings) == len(expected), f"{len(strings)} strings but {len(expected)} id lines"
    return list(zip(strings, expected))


def find_smollm() -> Path:
    """The default model, fetched into the cache by tpllama itself (skips if it cannot be had)."""
    from conftest import default_model_or_skip
    return Path(default_model_or_skip())


# ------------------------------------------------------------------------------------------------
# fixtures: one tokenizer of each kind
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_gguf():
    return load_tokenizer(open_model(str(shared("vocab-tests/ggml-vocab-llama-spm.gguf"))))


@pytest.fixture(scope="module")
def bpe_gguf():
    return load_tokenizer(open_model(str(shared("vocab-tests/ggml-vocab-llama-bpe.gguf"))))


@pytest.fixture(scope="module")
def llama2_sp():
    return load_tokenizer_file(str(shared("llama2-tokenizer/tokenizer.model")))


@pytest.fixture(scope="module")
def llama3_tt():
    return load_tokenizer_file(str(shared("llama3-tokenizer/tokenizer.model")))


@pytest.fixture(scope="module")
def stories_bin():
    return load_tokenizer(open_model(str(shared("stories260K/stories260K.bin"))))


@pytest.fixture(scope="module")
def stories_gguf():
    return load_tokenizer(open_model(str(shared("stories260K/stories260K.gguf"))))


@pytest.fixture(scope="module")
def smollm():
    path = find_smollm()
    return path, load_tokenizer(open_model(str(path)))


@pytest.fixture(scope="module")
def smollm_reference(smollm):
    transformers = pytest.importorskip("transformers")
    path, _ = smollm
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"           # a local file: never reach for the Hub
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


CORPUS = ["Once upon a time there was a little girl named Lily.", "She liked to play in the park with her dog.",
          "The sun was warm and the sky was blue. 123 456!", "Lily said: \"Hello, world!\"\n\nThe end."] * 10


def fake_hf_reader(directory: Path, vocab_size: int):
    """A reader of an HF model directory with these tokenizer files and this many embedding rows."""
    from tpllama.formats.tokenizer_source import TokenizerSource
    return SimpleNamespace(tokenizer_source=lambda: TokenizerSource.hf_directory(str(directory), vocab_size))


@pytest.fixture(scope="module")
def hf_bytelevel_dir(tmp_path_factory):
    """A fake HF model directory with a small trained byte-level BPE tokenizer.json and its configs."""
    from tokenizers import ByteLevelBPETokenizer
    d = tmp_path_factory.mktemp("hf_bytelevel")
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1,
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    trained.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (d / "config.json").write_text(json.dumps({"vocab_size": 384}))
    return d


@pytest.fixture(scope="module")
def hf_bytelevel(hf_bytelevel_dir):
    return load_tokenizer(fake_hf_reader(hf_bytelevel_dir, 384))


@pytest.fixture(scope="module")
def hf_metaspace(tmp_path_factory):
    """A SentencePiece-style tokenizer.json (Metaspace decoder: the leading space is dropped)."""
    from tokenizers import SentencePieceBPETokenizer
    d = tmp_path_factory.mktemp("hf_metaspace")
    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(CORPUS, vocab_size=200, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"])
    trained.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return load_tokenizer_file(str(d / "tokenizer.json"))


# ------------------------------------------------------------------------------------------------
# llama.cpp test vectors
# ------------------------------------------------------------------------------------------------

def test_vector_files_split_like_llama_cpp():
    vectors = vocab_vectors("ggml-vocab-llama-spm.gguf")
    strings = [s for s, _ in vectors]
    assert len(vectors) == 46
    assert strings[0] == "ied 4 ½ months"
    # the separator's own newline is not part of the string before it: "\n" is one newline
    assert dict(vectors)[""] == [] and dict(vectors)["\n"] == [29871, 13]
    assert dict(vectors)["\n\n\n"] == [29871, 13, 13, 13]
    assert "    Hello\n    Hello" in strings


@pytest.mark.parametrize("name, fixture", [("ggml-vocab-llama-spm.gguf", "spm_gguf"),
                                           ("ggml-vocab-llama-bpe.gguf", "bpe_gguf")])
def test_llama_cpp_vectors(name, fixture, request):
    tok = request.getfixturevalue(fixture)
    failures = [(s, tok.encode(s, add_bos=False), ids) for s, ids in vocab_vectors(name)
                if tok.encode(s, add_bos=False) != ids]
    assert not failures, f"{len(failures)} vectors differ, first: {failures[0]!r}"


@pytest.mark.parametrize("name, fixture", [("ggml-vocab-llama-spm.gguf", "spm_gguf"),
                                           ("ggml-vocab-llama-bpe.gguf", "bpe_gguf"),
                                           ("ggml-vocab-llama-bpe.gguf", "llama3_tt")])
def test_vectors_round_trip(name, fixture, request):
    tok = request.getfixturevalue(fixture)
    for s, ids in vocab_vectors(name):
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode(s)) == s          # with the default BOS, which decodes to ""


def test_gguf_defaults(spm_gguf, bpe_gguf):
    assert (spm_gguf.bos_id, spm_gguf.add_bos, spm_gguf.eos_ids) == (1, True, {2})
    assert spm_gguf.encode("Hello world") == [1, 15043, 3186]
    assert (bpe_gguf.bos_id, bpe_gguf.add_bos) == (128000, True)
    # Llama 3: <|end_of_text|>, <|eot_id|> and (named reserved in 3.0) nothing else from the vocab
    assert {128001, 128009} <= bpe_gguf.eos_ids
    assert bpe_gguf.encode("Hello") == [128000, 9906]


# ------------------------------------------------------------------------------------------------
# SentencePiece: Llama 2 tokenizer.model vs the GGUF spm vocab vs the sentencepiece library
# ------------------------------------------------------------------------------------------------

def test_llama2_tokenizer_model(llama2_sp):
    assert llama2_sp.encode("Once upon a time", add_bos=False) == [9038, 2501, 263, 931]
    assert llama2_sp.encode("Once upon a time") == [1, 9038, 2501, 263, 931]
    assert llama2_sp.vocab_size == 32000 and llama2_sp.eos_ids == {2}
    assert llama2_sp.decode([1, 9038, 2501, 263, 931, 2]) == "Once upon a time"


def test_llama2_model_agrees_with_gguf_spm_and_sentencepiece(llama2_sp, spm_gguf):
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared("llama2-tokenizer/tokenizer.model")))
    for s in [s for s, _ in vocab_vectors("ggml-vocab-llama-spm.gguf")] + STREAM_STRINGS:
        ids = llama2_sp.encode(s, add_bos=False)
        assert ids == spm_gguf.encode(s, add_bos=False) == sp.encode(s), repr(s)
        assert llama2_sp.decode(ids) == spm_gguf.decode(ids) == sp.decode(ids), repr(s)
    for i in (0, 1, 2, 3, 13, 259, 29871, 31999):
        assert llama2_sp.token_bytes(i) == spm_gguf.token_bytes(i)
    assert spm_gguf.token_bytes(13) == b"\n" and spm_gguf.token_bytes(15043) == b" Hello"


def test_spm_special_tokens(spm_gguf):
    # without parse_special "<s>" is text; with it, BOS, and the text after it gets the prefix space (as llama.cpp)
    assert spm_gguf.encode("<s>Hi", add_bos=False) == spm_gguf.encode("<s>Hi", add_bos=False, parse_special=False)
    assert 1 not in spm_gguf.encode("<s>Hi", add_bos=False)
    assert spm_gguf.encode("<s>Hi", add_bos=False, parse_special=True) == [1, 6324]
    # a rendered template that starts with BOS does not get a second one
    assert spm_gguf.encode("<s>Hi", parse_special=True) == [1, 6324]


# ------------------------------------------------------------------------------------------------
# Llama 3 tiktoken tokenizer.model
# ------------------------------------------------------------------------------------------------

def test_llama3_tiktoken(llama3_tt):
    assert llama3_tt.encode("Once upon a time", add_bos=False) == [12805, 5304, 264, 892]
    assert llama3_tt.encode("Once upon a time") == [128000, 12805, 5304, 264, 892]
    assert llama3_tt.vocab_size == 128256
    assert {128001, 128009} <= llama3_tt.eos_ids
    assert llama3_tt.encode("<|eot_id|>", add_bos=False, parse_special=True) == [128009]
    assert 128009 not in llama3_tt.encode("<|eot_id|>", add_bos=False)


def test_llama3_tiktoken_agrees_with_gguf_vocab(llama3_tt, bpe_gguf):
    import base64
    lines = shared("llama3-tokenizer/tokenizer.model").read_bytes().splitlines()
    for i in (0, 220, 1000, 12805, 50000, 127999):      # bytes straight from the base64 ranks
        b64, rank = lines[i].split()
        assert int(rank) == i
        assert llama3_tt.token_bytes(i) == bpe_gguf.token_bytes(i) == base64.b64decode(b64)
    for s in STREAM_STRINGS + ["<|begin_of_text|>Hi<|eot_id|>"]:
        for parse in (False, True):
            assert llama3_tt.encode(s, parse_special=parse) == bpe_gguf.encode(s, parse_special=parse), repr(s)


# ------------------------------------------------------------------------------------------------
# llama2.c stories260K
# ------------------------------------------------------------------------------------------------

def test_stories260k(stories_bin, stories_gguf):
    assert stories_bin.source.endswith("tok512.bin")
    assert stories_bin.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert stories_gguf.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert stories_bin.decode([1, 403, 407, 261, 378]) == "Once upon a time"
    assert stories_gguf.decode([1, 403, 407, 261, 378]) == "Once upon a time"
    first = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317]  # known greedy continuation
    assert stories_bin.decode(first) == stories_gguf.decode(first)
    assert stories_bin.decode([1, 403, 407, 261, 378] + first).startswith("Once upon a time, there was a little")
    assert (stories_bin.bos_id, stories_bin.eos_ids, stories_bin.vocab_size) == (1, {2}, 512)


def test_llama2c_algorithm_agrees_with_sentencepiece(stories_bin, stories_gguf):
    # tok512 is tiny: most of these fall back to bytes, which exercises byte fallback and merging
    strings = [s for s, _ in vocab_vectors("ggml-vocab-llama-spm.gguf")] + STREAM_STRINGS
    for s in strings:
        ids = stories_bin.encode(s)
        assert ids == stories_gguf.encode(s), repr(s)
        assert stories_bin.decode(ids) == s


# ------------------------------------------------------------------------------------------------
# SmolLM2 (GGUF gpt2 vocab, pre smollm) against HF transformers' GGUF tokenizer
# ------------------------------------------------------------------------------------------------

def test_smollm2_known_ids_and_chat(smollm):
    _, tok = smollm
    assert tok.add_bos is False and tok.vocab_size == 49152
    assert {0, 2} <= tok.eos_ids
    assert tok.encode("Hello world 12345 🙂\n\n x") == [19556, 905, 216, 33, 34, 35, 36, 37, 47526, 1116, 1792]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True) == [1, 4093, 198, 26843, 2]
    assert 1 not in tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == SMOLLM_CHAT_HI
    assert tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                           add_generation_prompt=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def smollm2_pipeline_reference(path):
    """The `tokenizers` library with SmolLM2's own tokenizer.json pre-tokenizer (Digits with
    individual digits, then ByteLevel with its regex) over the GGUF's vocabulary and merges."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, models, pre_tokenizers
    r = GGUFReader(str(path))
    field = lambda name: [bytes(r.fields[name].parts[i]).decode() for i in r.fields[name].data]
    ref = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(field("tokenizer.ggml.tokens"))},
                               merges=[tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                          use_regex=True)])
    return ref


def test_smollm2_isolates_every_numeric_character_as_its_tokenizer_json_does(smollm):
    """Non-ASCII numerals ("½", "٣", "²", "१", "Ⅻ") once stayed with the space before them (only
    0-9 were isolated), giving other ids than the model's tokenizer."""
    path, tok = smollm
    ref = smollm2_pipeline_reference(path)
    for s in ["  ½", "a ½", " ٣", "\n\n٣", "x\r\n²", "3 ½ cups", "ied 4 ½ months", " १ Ⅻ ٣٤", "digits 12345 and 3.14159"]:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids, repr(s)
    assert tok.encode("3 ½ cups") == [35, 216, 16738, 12382]


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm, smollm_reference):
    """transformers' GGUF converter leaves out SmolLM2's Digits step, which only non-ASCII numerals
    show (0-9 have no merges in this vocabulary): its ids are the reference for text without them,
    the tokenizer.json pipeline for all of it; its decoding and chat template for everything."""
    path, tok = smollm
    ref, pipeline = smollm_reference, smollm2_pipeline_reference(path)
    strings = [s for s, _ in vocab_vectors("ggml-vocab-llama-bpe.gguf")] + STREAM_STRINGS + [SMOLLM_CHAT_HI]
    for s in strings:
        ids = tok.encode(s, parse_special=True)
        if not any(c.isnumeric() and not "0" <= c <= "9" for c in s):
            assert ids == ref.encode(s, add_special_tokens=False), repr(s)
        if "<|" not in s:
            assert ids == pipeline.encode(s, add_special_tokens=False).ids, repr(s)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), repr(s)
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == ref.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------
# HF tokenizer.json
# ------------------------------------------------------------------------------------------------

def test_hf_tokenizer_json_matches_tokenizers(hf_bytelevel, hf_bytelevel_dir):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(hf_bytelevel_dir / "tokenizer.json"))
    for s in STREAM_STRINGS + CORPUS[:4] + ["<|im_start|>user\nHi<|im_end|>"]:
        ids = hf_bytelevel.encode(s, parse_special=True)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s)
        assert hf_bytelevel.decode(ids) == ref.decode(ids), repr(s)
    assert hf_bytelevel.encode("<|im_end|>") != [2]              # text unless parse_special
    assert hf_bytelevel.bos_id is None and hf_bytelevel.add_bos is False
    assert hf_bytelevel.eos_ids == {0, 2}
    # no template in tokenizer_config.json: ChatML because the vocabulary has <|im_start|>
    assert hf_bytelevel.render_chat([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_metaspace_tokenizer_json(hf_metaspace, tmp_path):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(hf_metaspace.source)
    assert hf_metaspace.strip_leading_space and hf_metaspace.add_bos and hf_metaspace.bos_id == 1
    for s in ["Once upon a time", "  the  dog", "Lily said hello"]:
        ids = hf_metaspace.encode(s, add_bos=False)
        assert ids == ref.encode(s, add_special_tokens=False).ids
        assert hf_metaspace.decode([1] + ids) == ref.decode(ids)


def test_hf_dir_vocab_size_rules(hf_bytelevel_dir):
    # HF embeddings may be padded past the tokenizer, never smaller
    assert load_tokenizer(fake_hf_reader(hf_bytelevel_dir, 320)).vocab_size == 320
    with pytest.raises(ModelFormatError, match=r"320 tokens.*vocab_size 100"):
        load_tokenizer(fake_hf_reader(hf_bytelevel_dir, 100))


def test_hf_dir_chat_template_and_generation_config(tmp_path, hf_bytelevel_dir):
    d = tmp_path / "model"
    shutil.copytree(hf_bytelevel_dir, d)
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}"
                "{% endfor %}{{ eos_token }}{{ strftime_now('%Y') | length }}")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = load_tokenizer(fake_hf_reader(d, 384))
    assert tok.eos_ids == {0, 1, 2}          # eos_token, generation_config, <|endoftext|> / <|im_end|>
    assert tok.render_chat([{"role": "user", "content": "héllo"}]) == '[user]"héllo"<|im_end|>4'
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))   # a list, as Qwen2.5's
    assert load_tokenizer(fake_hf_reader(d, 384)).eos_ids == {0, 1, 2, 7}


# ------------------------------------------------------------------------------------------------
# Streaming decode
# ------------------------------------------------------------------------------------------------

ALL_TOKENIZERS = ["spm_gguf", "bpe_gguf", "llama2_sp", "llama3_tt", "stories_bin", "stories_gguf",
                  "hf_bytelevel", "hf_metaspace", "smollm"]


def get_tokenizer(request, name):
    value = request.getfixturevalue(name)
    return value[1] if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_stream_decoder_matches_decode(name, request):
    tok = get_tokenizer(request, name)
    for s in STREAM_STRINGS:
        ids = tok.encode(s)                              # with BOS where the model adds one
        if tok.eos_id is not None:
            ids = ids + [tok.eos_id]
        stream = tok.stream_decoder()
        parts = [stream.add(i) for i in ids]
        text = "".join(parts) + stream.flush()
        assert text == tok.decode(ids), (name, s)
        assert "\ufffd" not in text, (name, s)           # no character was cut in half
        if name != "hf_metaspace":                       # (its NFKC/unknown pieces cannot round-trip)
            assert text == s, (name, s)


def test_stream_decoder_holds_split_characters(llama2_sp):
    ids = llama2_sp.encode("a🙂b", add_bos=False)        # the emoji is four <0xXX> byte tokens
    assert len(ids) >= 5
    stream = StreamDecoder(llama2_sp)
    parts = [stream.add(i) for i in ids]
    assert "🙂" in parts and parts.count("") == 3 and "".join(parts) == "a🙂b"


def test_stream_decoder_continuation_keeps_space(llama2_sp, stories_bin):
    for tok in (llama2_sp, stories_bin):
        ids = tok.encode(" upon", add_bos=False)
        assert tok.decode(ids) == " upon"               # the dummy prefix is gone, the real space stays
        cont = tok.encode("Once upon", add_bos=False)[1:]
        stream = tok.stream_decoder(at_start=False)
        assert "".join(stream.add(i) for i in cont) == " upon"
        stream = tok.stream_decoder()
        assert "".join(stream.add(i) for i in cont) == "upon"


def test_special_tokens_decode_to_nothing(bpe_gguf, llama2_sp, stories_bin):
    assert bpe_gguf.decode([128000, 9906, 128009, 128001]) == "Hello"
    assert bpe_gguf.token_bytes(128009) == b"<|eot_id|>"
    assert llama2_sp.decode([1, 15043, 2]) == "Hello"
    assert stories_bin.decode([1, 2]) == ""
    with pytest.raises(ValueError):
        llama2_sp.decode([32000])


# ------------------------------------------------------------------------------------------------
# Chat templates (fallbacks)
# ------------------------------------------------------------------------------------------------

def test_fallback_templates(llama3_tt, llama2_sp):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert llama3_tt.chat_template is None
    assert llama3_tt.render_chat(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = llama3_tt.encode(llama3_tt.render_chat(msgs), parse_special=True)
    assert ids[:2] == [128000, 128006] and ids.count(128000) == 1
    assert llama2_sp.render_chat(msgs + [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]")
    with pytest.raises(ChatTemplateError, match="alternate"):
        llama2_sp.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_truncated_tokenizer_bin(tmp_path):
    data = shared("stories260K/tok512.bin").read_bytes()
    bad = tmp_path / "tokenizer.bin"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="tokenizer.bin"):
        load_tokenizer_file(str(bad))
    # also when found next to a checkpoint
    shutil.copy(shared("stories260K/stories260K.bin"), tmp_path / "model.bin")
    with pytest.raises(ModelFormatError, match="tokenizer.bin.*truncated|truncated.*tokenizer.bin"):
        load_tokenizer(open_model(str(tmp_path / "model.bin")))


def test_no_tokenizer_found(tmp_path):
    shutil.copy(shared("stories260K/stories260K.bin"), tmp_path / "model.bin")
    with pytest.raises(ModelFormatError, match=r"tok512\.bin.*--tokenizer"):
        load_tokenizer(open_model(str(tmp_path / "model.bin")))


def test_vocab_size_mismatch():
    reader = open_model(str(shared("stories260K/stories260K.bin")))
    with pytest.raises(ModelFormatError, match=r"tokenizer\.model.*32000.*512"):
        load_tokenizer(reader, str(shared("llama2-tokenizer/tokenizer.model")))


def write_vocab_gguf(path: Path, model: str, with_model_keys: bool = False):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    if with_model_keys:                          # enough of a llama config for open_model
        w.add_block_count(1)
        w.add_embedding_length(8)
        w.add_feed_forward_length(16)
        w.add_head_count(2)
        w.add_vocab_size(5)
    w.add_tokenizer_model(model)
    w.add_token_list(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"])
    w.add_token_types([3, 2, 3, 3, 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_tokenizer(tmp_path):
    path = tmp_path / "bert-vocab.gguf"
    write_vocab_gguf(path, "bert")
    with pytest.raises(ModelFormatError, match=r"bert-vocab\.gguf.*'bert'"):
        load_tokenizer(None, str(path))
    model = tmp_path / "bert-model.gguf"
    write_vocab_gguf(model, "bert", with_model_keys=True)
    with pytest.raises(ModelFormatError, match=r"bert-model\.gguf.*'bert'.*--tokenizer"):
        load_tokenizer(open_model(str(model)))


def test_gguf_gpt2_without_merges(tmp_path):
    path = tmp_path / "nomerges.gguf"
    write_vocab_gguf(path, "gpt2")
    with pytest.raises(ModelFormatError, match=r"nomerges\.gguf.*merges"):
        load_tokenizer_file(str(path))


def test_bad_tiktoken_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nIg== 5\n")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.model.*rank 5"):
        load_tokenizer_file(str(path))


def write_llama_gguf(path: Path, *, vocabulary: bool, chat_template: Optional[str] = None):
    """A tensor-less GGUF with a 5-token llama config, optionally its SentencePiece vocabulary and a template."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_vocab_size(5)
    if vocabulary:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>", "\u2581hello", "\u2581"])
        w.add_token_types([2, 3, 3, 1, 1])
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_tokenizer_file_without_a_template_takes_the_models(tmp_path):
    template = "{{ bos_token }}T:{% for m in messages %}{{ m['content'] }}{% endfor %}"
    write_llama_gguf(tmp_path / "model.gguf", vocabulary=False, chat_template=template)
    write_llama_gguf(tmp_path / "vocab.gguf", vocabulary=True)
    tok = load_tokenizer(open_model(str(tmp_path / "model.gguf")), str(tmp_path / "vocab.gguf"))
    assert tok.chat_template == template
    assert tok.render_chat([{"role": "user", "content": "hello"}]) == "<s>T:hello"


def test_a_gguf_without_a_vocabulary_names_the_files_looked_for(tmp_path):
    write_llama_gguf(tmp_path / "model.gguf", vocabulary=False)
    with pytest.raises(ModelFormatError) as e:
        load_tokenizer(open_model(str(tmp_path / "model.gguf")))
    looked = ", ".join(str(tmp_path / n) for n in ("tok5.bin", "tokenizer.bin", "tokenizer.json", "tokenizer.model"))
    assert str(e.value).startswith(f"{tmp_path / 'model.gguf'}: no tokenizer found (looked for {looked}); pass ")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.bin").write_bytes(b"")      # the first of the files found is read
    with pytest.raises(ModelFormatError, match=r"tokenizer\.bin: too short for a llama2\.c tokenizer\.bin"):
        load_tokenizer(open_model(str(tmp_path / "model.gguf")))


def test_spm_model_proto_is_read_back_by_sentencepiece_with_long_and_multibyte_pieces():
    """The ModelProto a GGUF 'llama' vocabulary is rebuilt as, laid out by numpy, parsed by
    sentencepiece itself: every piece, score and type as given, including pieces whose lengths
    need 2-byte varints and pieces of 2-, 3- and 4-byte UTF-8 characters."""
    import sentencepiece as spm
    from tpllama.tokenizer.sentencepiece import spm_model_proto
    from tpllama.tokenizer.specials import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    extra = ["\u2581the", "x" * 118, "y" * 119, "z" * 130, "é" * 70, "語" * 50, "🙂" * 40, "<|user|>", "a"]
    tokens += extra
    types += [NORMAL] * (len(extra) - 2) + [USER_DEFINED, NORMAL]
    scores = [0.0] * 259 + [-float(i) - 0.25 for i in range(len(extra))]
    proto = spm_model_proto(tokens, scores, types, bos=1, eos=2, add_dummy_prefix=True, remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == len(tokens)
    assert [sp.id_to_piece(i) for i in range(len(tokens))] == tokens
    assert [sp.get_score(i) for i in range(len(tokens))] == scores
    assert [sp.is_byte(i) for i in range(len(tokens))] == [t == BYTE for t in types]
    assert [sp.is_control(i) for i in range(len(tokens))] == [t == CONTROL for t in types]
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)


# ------------------------------------------------------------------------------------------------
# snapshots: a GGUF vocabulary's tokenizer kept and read back (tokenizer/snapshot.py)
# ------------------------------------------------------------------------------------------------

def test_a_snapshot_read_back_gives_llama_cpps_ids_and_texts(spm_gguf, tmp_path):
    from tpllama.tokenizer import snapshot
    path = str(tmp_path / "vocab.tptok")
    assert snapshot.save(spm_gguf, path, "key-1")
    tok = snapshot.load(path, "key-1")
    assert tok is not None and tok is not spm_gguf
    for s, ids in vocab_vectors("ggml-vocab-llama-spm.gguf"):
        assert tok.encode(s, add_bos=False) == ids
        assert tok.decode(ids) == s
    assert (tok.bos_id, tok.add_bos, tok.eos_ids, tok.chat_template) == (spm_gguf.bos_id, spm_gguf.add_bos,
                                                                         spm_gguf.eos_ids, spm_gguf.chat_template)
    assert tok.specials == spm_gguf.specials
    assert [tok.token_bytes(i) for i in range(tok.vocab_size)] == [spm_gguf.token_bytes(i) for i in range(spm_gguf.vocab_size)]


def test_a_stale_or_damaged_snapshot_is_never_used(spm_gguf, bpe_gguf, tmp_path):
    from tpllama.tokenizer import snapshot
    path = tmp_path / "vocab.tptok"
    assert snapshot.save(spm_gguf, str(path), "key-1")
    assert snapshot.load(str(path), "key-2") is None                 # another model file or tpllama
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])                       # cut short
    assert snapshot.load(str(path), "key-1") is None
    flipped = bytearray(whole)
    flipped[len(whole) // 3] ^= 0x40                                 # one flipped bit inside the pieces
    path.write_bytes(bytes(flipped))
    assert snapshot.load(str(path), "key-1") is None
    assert snapshot.load(str(tmp_path / "absent.tptok"), "key-1") is None
    assert not snapshot.save(bpe_gguf, str(tmp_path / "bpe.tptok"), "key-1")    # BPE builds faster than it loads
    assert not (tmp_path / "bpe.tptok").exists()
