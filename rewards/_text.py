"""Shared helpers for rewards: turn a completion (string or chat-message list) into text."""

from __future__ import annotations


def completion_text(c) -> str:
    """TRL passes plain strings for standard datasets and [{"role", "content"}] lists for conversational ones."""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in c)
    if isinstance(c, dict):
        return str(c.get("content", ""))
    return str(c)
