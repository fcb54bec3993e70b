"""The sample prompts shown after training, chosen and cut so that none is longer than the model was trained on.

`automodel generate` feeds a prompt as [bos] + its tokens; a prompt longer than train.seq_len tokens asks the
model about positions it never saw in training (and may not have at all). So the prompts that fit are taken
first, in the data's order; when fewer than n fit, the rest are cut from the left to the longest ending that
fits: the end of a prompt (the question, a chat's generation prompt) is what the answer follows. (`chat`
first drops whole turns from the start of a long conversation; see ChatData.prompts.)
"""

from __future__ import annotations

CANDIDATES = 8  # prompts looked at per sample asked for, to find ones that fit


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def budget(tokenizer, seq_len: int) -> int:
    """The prompt tokens that fit in seq_len next to the bos token generation adds."""
    return seq_len - (tokenizer.bos_token_id is not None)


def cut(tokenizer, prompt: str, room: int) -> str:
    """The longest ending of `prompt` that is at most `room` tokens ("" when none is)."""
    if room <= 0:
        return ""
    if n_tokens(tokenizer, prompt) <= room:
        return prompt
    if getattr(tokenizer, "is_fast", False):  # character offsets: cut at a token boundary of the prompt
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        starts = [a for a, _ in enc["offset_mapping"]]
        endings = (prompt[starts[len(starts) - k]:] for k in range(min(room, len(starts)), 0, -1))
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        endings = (tokenizer.decode(ids[-k:]) for k in range(min(room, len(ids)), 0, -1))
    for text in endings:  # re-tokenized, an ending can merge differently: check it
        if text.strip() and n_tokens(tokenizer, text) <= room:
            return text
    return ""


def fitting(tokenizer, pairs: list[tuple[str, str]], n: int, seq_len: int) -> list[tuple[str, str]]:
    """Up to n (prompt, expected) pairs whose prompt, with the bos token generation adds, is at most seq_len tokens."""
    room = budget(tokenizer, seq_len)
    whole, long = [], []
    for prompt, expected in pairs:
        (whole if n_tokens(tokenizer, prompt) <= room else long).append((prompt, expected))
    out = whole[:n]
    for prompt, expected in long:
        if len(out) == n:
            break
        short = cut(tokenizer, prompt, room)
        if short:
            out.append((short, expected))
    return out
