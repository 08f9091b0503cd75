"""The terminal chat: conversation bookkeeping (KV cache reuse, dropping old turns) and
`python -m tpllama.chat` driven through a pipe, on one rank and under mpirun."""
import re
import time
from contextlib import contextmanager

import pytest

from interactive import Running, command, kill_tree
from mpi_util import REPO, mpi_env, mpirun

CTX = 512
# one kernel thread per process: CI machines are small and shared, and spinning OpenMP threads
# that outnumber the cores make every token slow
ONE_THREAD = ["-t", "1"]
QUESTION = "What is the capital of France?"
STATS = re.compile(r"\[prompt (\d+) tokens \((\d+) reused from cache\), (\d+) generated, [\d.]+ tokens/s, "
                   r"finish: (\w+)\]")


@pytest.fixture(scope="module")
def model(smollm2):
    import tpllama
    return tpllama.load(smollm2, ctx_size=CTX, threads=1)


def raw_text(tokenizer, ids):
    """The text the model reads for ids, special tokens included (decode() hides them)."""
    return b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8")


def answers(stdout: str):
    """The answers printed after each '> ' prompt."""
    return [part.strip() for part in stdout.split("> ") if part.strip()]


# ------------------------------------------------------------------ Conversation


def test_first_turn_is_the_prompt_generate_uses(model):
    from tpllama.conversation import Conversation
    conversation = Conversation(model.tokenizer, system="You are terse.")
    assert conversation.prompt_for(QUESTION) == model.encode_prompt(QUESTION, chat=True, system="You are terse.")


def test_the_second_turn_reads_only_the_new_turn(model):
    from tpllama.conversation import Conversation
    tok = model.tokenizer
    conversation = Conversation(tok, system="You are terse.")
    model.reset()
    first = conversation.prompt_for(QUESTION)
    g1 = model.generate(first, 16, temperature=0)
    conversation.add_turn(QUESTION, first, g1.tokens, g1.text)
    cached = list(model.history)
    assert len(cached) >= len(first) + len(g1.tokens) - 1

    second, dropped = conversation.prompt_within("And of Germany?", model.ctx, 64)
    assert dropped == 0
    assert second[:len(cached)] == cached, "the new prompt must start with what the cache holds"
    g2 = model.generate(second, 8, temperature=0)
    assert g2.stats.cached_tokens == len(cached)
    assert g2.stats.prompt_tokens - g2.stats.cached_tokens < 20, "only the new turn is read"
    # and it is the conversation the chat template describes
    whole = tok.render_chat([{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION},
                             {"role": "assistant", "content": g1.text}, {"role": "user", "content": "And of Germany?"}])
    assert raw_text(tok, second) == whole


def fill(conversation, turns: int):
    tok = conversation.tokenizer
    for i in range(turns):
        question, answer = f"Question number {i}?", f"Answer number {i}: " + "blah " * 20
        ids = conversation.prompt_for(question)
        conversation.add_turn(question, ids, tok.encode(answer, add_bos=False), answer)


def test_a_full_context_drops_the_oldest_turns_and_keeps_the_system_prompt(model):
    from tpllama.conversation import Conversation
    tok = model.tokenizer
    conversation = Conversation(tok, system="Be brief.")
    fill(conversation, 4)
    full = len(conversation.prompt_for("Last question?"))
    ids, dropped = conversation.prompt_within("Last question?", ctx=full + 16 - 5, room=16)
    assert dropped == 1 and conversation.turns == 3
    assert len(ids) + 16 <= full + 16 - 5
    text = raw_text(tok, ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Question number 0" not in text and "Question number 1" in text and text.endswith(
        "Last question?<|im_end|>\n<|im_start|>assistant\n")


def test_a_message_too_long_for_the_context_keeps_the_conversation(model):
    from tpllama.conversation import Conversation, MessageTooLong
    conversation = Conversation(model.tokenizer)
    fill(conversation, 2)
    with pytest.raises(MessageTooLong, match="context holds 512"):
        conversation.prompt_within("word " * 600, ctx=CTX, room=16)
    assert conversation.turns == 2


def test_reset_forgets_the_turns(model):
    from tpllama.conversation import Conversation
    conversation = Conversation(model.tokenizer, system="Be brief.")
    fill(conversation, 2)
    conversation.reset()
    assert conversation.turns == 0
    assert conversation.prompt_for("Hi") == model.encode_prompt("Hi", chat=True, system="Be brief.")


# ------------------------------------------------------------------ python -m tpllama.chat

CHAT_ARGS = ["-c", str(CTX), "-n", "16", "--temp", "0", "--stats", *ONE_THREAD]


def test_help_explains_the_flags_and_commands():
    with Running(command(1, "tpllama.chat", ["--help"]), stdin=False) as chat:
        assert chat.wait(60) == 0
        for text in ("-sys", "--temp", "--top-k", "-n N_PREDICT", "-c CTX_SIZE", "/reset", "/exit", "Ctrl-C"):
            assert text in chat.stdout, text


def test_chat_on_one_rank_through_a_pipe(smollm2, model):
    lines = f"{QUESTION}\nAnd of Germany?\n/reset\n{QUESTION}\n"
    with Running(command(1, "tpllama.chat", ["-m", smollm2, *CHAT_ARGS])) as chat:
        chat.send(lines)
        chat.close_stdin()   # end of input (Ctrl-D) ends the chat
        assert chat.wait(180) == 0, chat.report()
        said = answers(chat.stdout)
        stats = [tuple(int(x) for x in m.groups()[:3]) for m in STATS.finditer(chat.stderr)]
    assert len(said) == 3 and len(stats) == 3, chat.report()
    expected = model.generate(QUESTION, 16, temperature=0, chat=True).text
    assert said[0] == expected.strip()
    (p1, _, n1), (p2, r2, _), (p3, _, _) = stats
    assert r2 >= p1 + n1 - 1, "the second turn reuses the first turn's cache"
    assert p2 - r2 < 20
    assert "[conversation forgotten]" in chat.stderr
    assert p3 == p1 and said[2] == said[0], "after /reset the conversation starts over"


def test_a_continued_message_cut_off_by_the_end_of_input_is_still_answered(smollm2, model):
    """A last line ending in a backslash (more to come) right before the end of the input was
    dropped without a word; the message as it stands is sent."""
    with Running(command(1, "tpllama.chat", ["-m", smollm2, *CHAT_ARGS])) as chat:
        chat.send(f"{QUESTION}\\\n")
        chat.close_stdin()
        assert chat.wait(180) == 0, chat.report()
        said = answers(chat.stdout)
    assert len(said) == 1, chat.report()
    assert said[0] == model.generate(QUESTION, 16, temperature=0, chat=True).text.strip()


def test_a_full_context_drops_old_turns_instead_of_failing(smollm2):
    # no -m: the default model (the smollm2 fixture has made sure it is in the cache)
    # enough short turns that the context fills whatever the answers' exact lengths, then one too long
    questions = ["Hi!", "Tell me about Paris.", "And London?", "And Rome?", "And Berlin?", "And Madrid?",
                 "And Vienna?", "word " * 200]
    with Running(command(1, "tpllama.chat", ["-c", "160", "-n", "16", "--temp", "0", "--stats", *ONE_THREAD])) as chat:
        chat.send("".join(q + "\n" for q in questions))
        chat.close_stdin()
        assert chat.wait(180) == 0, chat.report()
    assert len(answers(chat.stdout)) == 7, chat.report()
    assert re.search(r"\[context full: dropped the \d+ oldest turn\(s\); \d+ left\]", chat.stderr), chat.report()
    assert re.search(r"\[error: the message needs \d+ tokens .* context holds 160", chat.stderr), chat.report()
    assert all(int(m.group(1)) + 16 <= 160 for m in STATS.finditer(chat.stderr))


@pytest.mark.parametrize("answer, finish", [("<|im_end|>", "stop"), ("<|endoftext|>", "stop"), ("A", "length")])
def test_a_qwen_models_end_of_turn_tokens_end_the_reply(tmp_path, answer, finish):
    """A Qwen GGUF (keys as llama.cpp writes Qwen2.5-Instruct) whose model always says `answer`:
    <|im_end|> (its eos) and <|endoftext|> (bos and padding in the file, an end-of-turn token by
    name) end the reply at once; an ordinary token runs on to -n."""
    from gguf_writer import write_one_token_qwen
    model = write_one_token_qwen(tmp_path / "qwen.gguf", answer)
    # no shard file: the three models differ in one output row, which the sampled fingerprint may not see
    args = ["-m", str(model), "-c", "64", "-n", "6", "--temp", "0", "--stats", "--no-shard-cache", *ONE_THREAD]
    with Running(command(1, "tpllama.chat", args)) as chat:
        chat.send("Hi\n")
        chat.close_stdin()
        assert chat.wait(60) == 0, chat.report()
    stats = [m.groups() for m in STATS.finditer(chat.stderr)]
    assert [(int(n), end) for _, _, n, end in stats] == [(0 if finish == "stop" else 6, finish)], chat.report()
    assert answers(chat.stdout) == ([] if finish == "stop" else ["AAAAAA"]), chat.report()


@pytest.mark.mpi
def test_chat_on_two_ranks_through_a_pipe(smollm2):
    # Open MPI 5's mpirun does not pass the end of stdin on to rank 0, so the chat ends with /exit
    with Running(command(2, "tpllama.chat", ["-m", smollm2, *CHAT_ARGS])) as chat:
        chat.send(f"{QUESTION}\nAnd of Germany?\n/exit\n")
        assert chat.wait(180) == 0, chat.report()
        said = answers(chat.stdout)
        stats = [tuple(int(x) for x in m.groups()[:3]) for m in STATS.finditer(chat.stderr)]
    assert len(said) == 2 and len(stats) == 2, chat.report()
    (p1, _, n1), (_, r2, _) = stats
    assert r2 >= p1 + n1 - 1
    reference = mpirun(2, ["-m", "tpllama.generate", "-m", smollm2, "-c", str(CTX), "--temp", "0", "-n", "16",
                           "-p", QUESTION, *ONE_THREAD])
    assert said[0] == reference.stdout.strip()


RANKS = [1, pytest.param(2, marks=pytest.mark.mpi)]
TERMINAL_ARGS = ["-c", str(CTX), "-n", "400", "--temp", "0", "--stats", *ONE_THREAD]


@contextmanager
def at_a_terminal(ranks: int, args):
    """The chat in a pseudo-terminal, as a user runs it (under mpirun for 2 ranks): the test types
    real control characters, which the terminal turns into signals (^C) or the end of input (^D)."""
    import pexpect
    argv = command(ranks, "tpllama.chat", args)
    chat = pexpect.spawn(argv[0], argv[1:], env=mpi_env(), cwd=str(REPO), encoding="utf-8", timeout=120)
    try:
        chat.expect(r"answers of at most (\d+) tokens \(-n\)")
        chat.answer_limit = int(chat.match.group(1))
        chat.expect("> ")
        yield chat
    finally:
        if chat.isalive():
            kill_tree(chat.pid)
        chat.close(force=True)


def ask(chat, question: str) -> None:
    """Type a question and wait until the answer is a few words long."""
    chat.sendline(question)
    chat.expect_exact(question + "\r\n")           # the terminal's echo of the line
    chat.expect(r"\w+\W+\w+\W+\w+\W+\w+\W+\w+")    # the answer streams


@pytest.mark.parametrize("ranks", RANKS)
def test_at_a_terminal_ctrl_c_stops_the_answer_and_twice_quits(smollm2, ranks):
    with at_a_terminal(ranks, ["-m", smollm2, *TERMINAL_ARGS]) as chat:
        ask(chat, "Write a very long story about a dragon who learns to fly.")
        assert "finish:" not in chat.before, "the answer shows while it is being written, not at its end"
        chat.sendintr()                                # Ctrl-C: this answer stops, the chat goes on
        chat.expect(r"\[answer stopped\]")
        chat.expect(STATS)
        assert chat.match.group(4) == "cancelled" and int(chat.match.group(3)) < 400
        chat.expect("> ")
        ask(chat, "Tell me another long story, please.")
        chat.sendintr()
        time.sleep(0.05)
        chat.sendintr()                                # twice within a second: quit, every rank
        chat.expect(pexpect_eof(), timeout=60)
        chat.close()
        assert chat.exitstatus == 0, chat.before
        assert "interrupted" not in chat.before and "prterun" not in chat.before


@pytest.mark.parametrize("ranks", RANKS)
def test_at_a_terminal_ctrl_d_at_the_prompt_quits_every_rank(stories_bin, ranks):
    with at_a_terminal(ranks, ["-m", str(stories_bin), *ONE_THREAD]) as chat:
        assert chat.answer_limit == 512, "the banner states the default limit of an answer"
        chat.sendeof()                                 # Ctrl-D at the prompt
        chat.expect(pexpect_eof(), timeout=60)
        chat.close()
        assert chat.exitstatus == 0, chat.before
        assert chat.before.endswith("\r\n"), "the shell's prompt starts on a line of its own"


@pytest.mark.parametrize("ranks", RANKS)
def test_at_a_terminal_ctrl_c_at_the_prompt_quits_every_rank(stories_bin, ranks):
    with at_a_terminal(ranks, ["-m", str(stories_bin), *ONE_THREAD]) as chat:
        chat.sendintr()
        chat.expect(pexpect_eof(), timeout=60)
        chat.close()
        assert chat.exitstatus == 0, chat.before


@pytest.mark.mpi
def test_under_mpirun_the_end_of_a_pipe_ends_the_chat(stories_bin):
    # Open MPI 5 never passes the end of its stdin on to rank 0: rank 0 watches mpirun's stdin
    with Running(command(2, "tpllama.chat", ["-m", str(stories_bin), "-n", "8", *ONE_THREAD])) as chat:
        chat.send("Once upon a time\n")
        chat.close_stdin()
        assert chat.wait(60) == 0, chat.report()
    assert len(answers(chat.stdout)) == 1, chat.report()


def pexpect_eof():
    import pexpect
    return pexpect.EOF
