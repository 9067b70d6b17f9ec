"""Record formats of supervised fine-tuning data, and the prompt templates they are rendered with.

A parser turns one JSON object into samples; a sample is a tuple of (text, carries_loss) segments
that sft_data.tokenize_record turns into ids and labels. Formats:

    alpaca    {"instruction", "input"?, "output"}: Stanford Alpaca's two prompt templates.
    messages  {"messages": [{"role": "system"?|"user"|"assistant", "content"}, ...]}
    sharegpt  {"conversations": [{"from": "human"|"gpt", "value"}, ...]} (Vicuna's training data)
    oasst     one OpenAssistant message tree per line (the *.trees.jsonl export): every thread the
              Open-Assistant SFT loader keeps becomes one sample (see oasst_threads).

Conversations (messages, sharegpt, oasst) are rendered with FastChat's Vicuna v1.1 template:

    {system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>...

with the loss on each assistant reply and its </s> only, as FastChat's train.py masks it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Stanford Alpaca's two prompt templates (tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# FastChat's "vicuna_v1.1" conversation template: its system message, roles and separators.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
FORMATS = ("alpaca", "messages", "sharegpt", "oasst")
TEMPLATES = ("vicuna_v1.1",)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # FastChat's train.py knows these two only


class SftDataError(ValueError):
    """A malformed training record; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Rendering:
    """How conversations become text, and which OpenAssistant threads are kept."""

    template: str = "vicuna_v1.1"
    system_prompt: str | None = None  # None: the template's own
    oasst_languages: tuple = ("en",)
    oasst_top_k: int | None = None  # keep assistant replies ranked below this (None: all)

    @classmethod
    def from_config(cls, data_cfg) -> "Rendering":
        return cls(template=data_cfg.template, system_prompt=data_cfg.system_prompt,
                   oasst_languages=tuple(data_cfg.oasst_languages), oasst_top_k=data_cfg.oasst_top_k)


def string_field(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise SftDataError(f"{where}: field '{key}' missing")
        return ""
    if not isinstance(obj[key], str):
        raise SftDataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca(obj: dict, where: str, rendering: Rendering) -> list[tuple]:
    instruction = string_field(obj, "instruction", where)
    input_text = string_field(obj, "input", where, required=False)
    output = string_field(obj, "output", where)
    return [((alpaca_prompt(instruction, input_text), False), (output, True))]


def vicuna_v11(turns: list[tuple[str, str]], system: str) -> tuple:
    """FastChat's get_prompt for vicuna_v1.1 (sep " ", sep2 "</s>"), cut into segments: each user
    turn with the "ASSISTANT:" that follows it is prompt; " " + reply is the response (the </s> after
    it is added by the tokenizer step). The space after "ASSISTANT:" goes with the reply, so the
    reply's first word is the piece it is in the whole conversation."""
    segments = []
    for i, (role, content) in enumerate(turns):
        if role == "user":
            head = system + " " if i == 0 else ""
            segments.append((f"{head}USER: {content} ASSISTANT:", False))
        else:
            segments.append((" " + content, True))
    return tuple(segments)


def render(turns: list[tuple[str, str]], system: str | None, where: str, rendering: Rendering) -> tuple:
    """Turns that alternate user, assistant, ... and end with the assistant -> segments."""
    if not turns:
        raise SftDataError(f"{where}: the conversation has no turns")
    for i, (role, content) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise SftDataError(f"{where}: turn {i} is {role!r}; turns alternate user, assistant, ... "
                               f"(expected {want!r})")
        if not content:
            raise SftDataError(f"{where}: turn {i} is empty")
    if len(turns) % 2:
        raise SftDataError(f"{where}: the conversation ends with a user turn; it must end with the assistant")
    if system is None:
        system = rendering.system_prompt if rendering.system_prompt is not None else VICUNA_SYSTEM
    return vicuna_v11(turns, system)


def messages(obj: dict, where: str, rendering: Rendering) -> list[tuple]:
    """{"messages": [...]}; a leading {"role": "system"} message replaces the system prompt."""
    items = obj.get("messages")
    if items is None:
        raise SftDataError(f"{where}: field 'messages' missing")
    if not isinstance(items, list) or not items:
        raise SftDataError(f"{where}: field 'messages' must be a non-empty list of turns")
    turns, system = [], None
    for i, turn in enumerate(items):
        at = f"{where}: messages[{i}]"
        if not isinstance(turn, dict):
            raise SftDataError(f"{at} must be an object with 'role' and 'content'")
        role, content = string_field(turn, "role", at), string_field(turn, "content", at)
        if role == "system" and i == 0:
            system = content
        elif role in ("user", "assistant"):
            turns.append((role, content))
        else:
            raise SftDataError(f"{at}: field 'role' is {role!r}; expected 'user' or 'assistant' "
                               "('system' only as the first message)")
    return [render(turns, system, f"{where}: messages", rendering)]


def sharegpt(obj: dict, where: str, rendering: Rendering) -> list[tuple]:
    """{"conversations": [{"from": "human"|"gpt", "value"}, ...]}, as FastChat's train.py reads it:
    a first message not from the human is dropped; a last human message (which would carry no loss)
    is dropped too."""
    items = obj.get("conversations")
    if items is None:
        raise SftDataError(f"{where}: field 'conversations' missing")
    if not isinstance(items, list):
        raise SftDataError(f"{where}: field 'conversations' must be a list of turns")
    turns = []
    for i, turn in enumerate(items):
        at = f"{where}: conversations[{i}]"
        if not isinstance(turn, dict):
            raise SftDataError(f"{at} must be an object with 'from' and 'value'")
        sender, value = string_field(turn, "from", at), string_field(turn, "value", at)
        if sender not in SHAREGPT_ROLES:
            raise SftDataError(f"{at}: field 'from' is {sender!r}; expected 'human' or 'gpt'")
        turns.append((SHAREGPT_ROLES[sender], value))
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    if turns and turns[-1][0] == "user":
        turns = turns[:-1]
    return [render(turns, None, f"{where}: conversations", rendering)]


# ---------------------------------------------------------------- OpenAssistant trees


def oasst_threads(tree: dict, where: str, languages: tuple, top_k: int | None) -> list[list[dict]]:
    """The threads (root-to-node message lists) of one tree that Open-Assistant's SFT loader
    (model_training/custom_datasets/oasst_dataset.py, load_oasst_export, mode "sft") trains on:

    - the tree is kept if tree_state is "ready_for_export", its prompt passed review
      (review_result) and the prompt's lang is one of `languages`;
    - a thread is every path from the prompt to a leaf with at least 2 messages that ends on an
      assistant message, or on a prompter leaf that is the first reply of its parent (that leaf is
      then dropped, so the parent's thread appears once);
    - a thread is dropped if any message is deleted or synthetic, or, with top_k, if an assistant
      message is ranked >= top_k (an unranked one counts only where it had no siblings).
    """
    if not isinstance(tree.get("tree_state"), str):
        raise SftDataError(f"{where}: field 'tree_state' missing (not an OpenAssistant trees export line?)")
    prompt = tree.get("prompt")
    if not isinstance(prompt, dict):
        raise SftDataError(f"{where}: field 'prompt' missing or not a message object")
    if tree["tree_state"] != "ready_for_export" or not prompt.get("review_result") or prompt.get("lang") not in languages:
        return []

    def kept(thread: list[dict]) -> bool:
        if any(m.get("deleted") or m.get("synthetic") for m in thread):
            return False
        if top_k is not None:
            for i, m in enumerate(thread):
                if m["role"] != "assistant":
                    continue
                if m.get("rank") is None:
                    if i > 0 and len(thread[i - 1].get("replies") or []) > 1:
                        return False
                elif m["rank"] >= top_k:
                    return False
        return True

    threads = []

    def visit(node: dict, parents: list[dict], path: str) -> None:
        if not isinstance(node, dict):
            raise SftDataError(f"{where}: {path} is not a message object")
        string_field(node, "text", f"{where}: {path}")
        if string_field(node, "role", f"{where}: {path}") not in ("prompter", "assistant"):
            raise SftDataError(f"{where}: {path}: field 'role' is {node['role']!r}; expected 'prompter' or 'assistant'")
        thread = parents + [node]
        replies = node.get("replies") or []
        if (len(thread) > 1 and not replies
                and (node["role"] == "assistant" or (thread[-2].get("replies") or [None])[0] is node)
                and kept(thread)):
            threads.append(thread[:-1] if node["role"] == "prompter" else thread)
        for i, child in enumerate(replies):
            visit(child, thread, f"{path}.replies[{i}]")

    visit(prompt, [], "prompt")
    return threads


def oasst(obj: dict, where: str, rendering: Rendering) -> list[tuple]:
    out = []
    for thread in oasst_threads(obj, where, rendering.oasst_languages, rendering.oasst_top_k):
        turns = [("user" if m["role"] == "prompter" else "assistant", m["text"]) for m in thread]
        out.append(render(turns, None, f"{where}: thread ending at message {thread[-1].get('message_id', '?')}",
                          rendering))
    return out


PARSERS = {"alpaca": alpaca, "messages": messages, "sharegpt": sharegpt, "oasst": oasst}
assert tuple(PARSERS) == FORMATS

