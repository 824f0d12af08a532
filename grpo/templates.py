"""Prompt templates: a shipped Jinja2 file by name (`r1_zero`), a .jinja file by path, or `chat` for the
tokenizer's own chat template (`tokenizer.apply_chat_template`)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2


@lru_cache(maxsize=32)
def _load(name: str) -> jinja2.Template:
    """Compile a template; `name` is a shipped template name or a path to a .jinja file."""
    path = Path(name)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise FileNotFoundError(f"template file {name} does not exist")
        text = path.read_text()
    else:
        f = resources.files("templates") / f"{name}.jinja"
        if not f.is_file():
            shipped = sorted(p.name[:-6] for p in resources.files("templates").iterdir() if p.name.endswith(".jinja"))
            raise FileNotFoundError(f"no template named {name!r}; shipped: {', '.join(shipped)}, or 'chat', or a .jinja path")
        text = f.read_text()
    return jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined).from_string(text)


def render(template: str, prompt, tokenizer=None, **row) -> str:
    """The text fed to the model for one dataset row. `prompt` may be a string or a chat-message list."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, list):  # a conversational row under a plain template: use the last user turn
        prompt = next(m["content"] for m in reversed(prompt) if m.get("role") == "user")
    return _load(template).render(prompt=prompt, **{k: v for k, v in row.items() if k != "prompt"})


def check(template: str) -> None:
    """Fail at config time, not mid-run, if the template cannot be found or compiled."""
    if template != "chat":
        _load(template)
