"""Prompt templates: R1-Zero word for word, chat templates through the tokenizer, user files by path."""

import pytest

from grpo.data.tokenizer import train_bpe
from grpo.templates import check, render

R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
           "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
           "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
           "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:")


def test_r1_zero_is_word_for_word():
    assert render("r1_zero", "Compute 2 + 2") == R1_ZERO.format(prompt="Compute 2 + 2")


def test_chat_template_goes_through_tokenizer():
    tok = train_bpe(["hello world <|user|> <|assistant|>"] * 20, vocab_size=300)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert render("chat", "hi", tok) == "<|user|>hi\n<|assistant|>"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render("chat", msgs, tok) == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    with pytest.raises(ValueError, match="chat_template"):
        render("chat", "hi", train_bpe(["x y"] * 5, vocab_size=300))


def test_template_file_by_path_and_errors(tmp_path):
    f = tmp_path / "mine.jinja"
    f.write_text("Q: {{ prompt }} ({{ lang }})\nA:")
    assert render(str(f), "2+2?", lang="en") == "Q: 2+2? (en)\nA:"
    with pytest.raises(FileNotFoundError, match="no template named 'r1_zeroo'"):
        check("r1_zeroo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check(str(tmp_path / "missing.jinja"))
