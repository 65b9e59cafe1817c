"""The request text of a training row or an inference request: what is embedded and clustered.

:func:`request_text` is the one function every path calls (preprocessing, the training lookup,
generation, serving, lm-eval, usage reports), so one request gets one cluster wherever it is
seen. The rules, per shape of what comes in (docs/clustering.md, "Same cluster everywhere"):

* a **row** (a mapping in a training data format) with ``template="auto"``: the user turns of
  ``messages`` / ``conversations`` (role/content or from/value); else the first non-empty of
  instruction/question/prompt/query/text plus input/context. Never the answer.
* a **preference row** (DPO/IPO: prompt + chosen + rejected; KTO: prompt + completion) is
  its prompt's request: ``prompt`` as a string or as chat messages (TRL's conversational
  format), or, with no prompt field (the implicit-prompt format), the user turns of
  ``chosen``, which ``rejected`` shares; never a completion. Chosen and rejected therefore
  always get the same cluster, the one the prompt alone gets at inference.
* a row with a custom ``text_template`` (e.g. ``"{question}"``): the template over the row's
  fields, missing fields empty (as preprocessing always did).
* **chat messages** (a list of turns): their user turns, exactly as the chat row they come from.
* a **plain prompt** (a string): with ``"auto"`` the prompt itself; with a template of one field
  the prompt *is* that field (``"Q: {question}"`` -> ``"Q: " + prompt``); a template of several
  fields cannot be filled from one string, which is an error naming the fields (pass a row).
* a string already formatted as a prompt (axolotl's alpaca instruct frame, or a ChatML
  conversation) is read back to its instruction/input or user turns, in rows and plain prompts
  alike, so ``format_prompt(p)`` and ``p`` get the same text.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ClusteringError

if TYPE_CHECKING:
    import datasets

#: Columns that hold chat turns, in the order they are looked for.
CHAT_KEYS = ("messages", "conversations", "conversation")
# ShareGPT-style speaker names -> the chat-template roles (user, assistant, system).
_ROLE_NAMES = {"human": "user", "gpt": "assistant", "model": "assistant"}
_PROMPT_KEYS = ("instruction", "question", "prompt", "query", "text")
_INPUT_KEYS = ("input", "context")

#: What a request can be: a plain prompt, chat messages, or a row in a training data format.
Request = str | Sequence[Mapping[str, Any]] | Mapping[str, Any]

# axolotl's AlpacaPrompter (instruct style) frame; tests check it against axolotl's strings.
ALPACA_SYSTEM_PROMPTS = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
)
_SYSTEMS = "|".join(re.escape(s) for s in ALPACA_SYSTEM_PROMPTS)
_ALPACA = re.compile(
    rf"\A(?:(?:{_SYSTEMS})\n\n)?### Instruction:\n(?P<instruction>.*?)"
    r"(?:\n\n### Input:\n(?P<input>.*?))?\n\n### Response:(?:\n.*)?\Z",
    re.S,
)
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|\Z)", re.S)
_LLAMA3_TURN = re.compile(
    r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|\Z)", re.S)
#: Columns of a preference row that hold a completion (never part of the request).
PREFERENCE_COMPLETION_KEYS = ("chosen", "rejected", "completion")


class _EmptyMissing(dict):
    def __missing__(self, key: str) -> str:
        return ""


def template_fields(template: str) -> list[str]:
    """The row fields a text template reads, in order, without repeats ('{a.b}' reads 'a')."""
    names: list[str] = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if name not in names:
            names.append(name)
    return names


def check_template(template: str) -> None:
    """Fail early (not on row 10,000) on a malformed format string."""
    if template == "auto":
        return
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise ClusteringError(
            f"moce.clustering.text_template {template!r} is not a valid format string ({exc}); "
            "use e.g. '{instruction}\\n{input}' or 'auto'."
        ) from exc
    if not fields:
        raise ClusteringError(
            f"moce.clustering.text_template {template!r} names no field; every row would embed "
            "the same text. Use e.g. '{instruction}\\n{input}' or 'auto'."
        )
    if any(not f or f.isdigit() for f in fields):
        raise ClusteringError(
            f"moce.clustering.text_template {template!r} has a positional field ('{{}}' or "
            "'{0}'); name the row's field, e.g. '{question}'."
        )


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # multimodal content: [{"type": "text", "text": ...}, ...]
        value = "\n".join(
            _as_text(p.get("text")) if isinstance(p, Mapping) else _as_text(p) for p in value
        )
    return "" if value is None else str(value).strip()


def chat_messages(turns: Sequence[Any]) -> list[dict[str, Any]]:
    """Chat turns in any supported spelling (``role``/``content`` or ShareGPT's
    ``from``/``value``, ``human``/``gpt`` speakers) as ``{"role", "content"}`` messages with
    the chat-template role names; entries that are not turns are skipped."""
    out = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            continue
        role = str(turn.get("role", turn.get("from", ""))).lower()
        out.append({"role": _ROLE_NAMES.get(role, role),
                    "content": turn.get("content", turn.get("value", ""))})
    return out


def _chat_user_text(turns: Sequence[Any]) -> str:
    parts = [_as_text(m["content"]) for m in chat_messages(turns) if m["role"] == "user"]
    return "\n".join(p for p in parts if p)


def unformat_prompt(text: str) -> str:
    """A prompt already put in a prompt frame, read back to its request text; other text as is.

    Recognised: axolotl's alpaca instruct frame (``### Instruction: ... ### Response:``, with
    or without input and system line; an answer after the response cue is dropped) ->
    instruction + input; a ChatML conversation (``<|im_start|>user ...``) or a Llama 3 one
    (``<|start_header_id|>user<|end_header_id|>``, as axolotl's ``llama3.*`` preference types
    write prompts) -> its user turns.
    """
    text = text.strip()
    if "### Instruction:" in text:
        match = _ALPACA.match(text)
        if match:
            parts = (match["instruction"], match["input"] or "")
            return "\n".join(p.strip() for p in parts if p.strip())
    if text.startswith("<|im_start|>"):
        turns = [{"role": r, "content": c} for r, c in _CHATML_TURN.findall(text)]
        return _chat_user_text(turns)
    if "<|start_header_id|>" in text:
        turns = [{"role": r, "content": c} for r, c in _LLAMA3_TURN.findall(text)]
        if turns:
            return _chat_user_text(turns)
    return text


def _row_text(row: Mapping[str, Any], template: str) -> str:
    if template != "auto":
        values = _EmptyMissing({k: _as_text(v) for k, v in row.items()})
        return _format(template, values)
    for key in CHAT_KEYS:
        turns = row.get(key)
        if isinstance(turns, list) and turns:
            return _chat_user_text(turns)
    prompt_turns = row.get("prompt")
    if _is_turns(prompt_turns):  # TRL's conversational preference format
        return _chat_user_text(prompt_turns)
    if not any(_as_text(row.get(k)) for k in _PROMPT_KEYS) and _is_turns(row.get("chosen")):
        # Implicit prompt: the shared user turns of chosen (rejected carries the same ones).
        return _chat_user_text(row["chosen"])
    prompt = next((_as_text(row[k]) for k in _PROMPT_KEYS if _as_text(row.get(k))), "")
    extra = next((_as_text(row[k]) for k in _INPUT_KEYS if _as_text(row.get(k))), "")
    if not extra:
        prompt = unformat_prompt(prompt)
    return "\n".join(p for p in (prompt, extra) if p)


def _is_turns(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, Mapping) for t in value) \
        and any("role" in t or "from" in t for t in value)


def _format(template: str, values: Mapping[str, Any]) -> str:
    try:
        return template.format_map(values).strip()
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise ClusteringError(
            f"moce.clustering.text_template {template!r} cannot be filled "
            f"({type(exc).__name__}: {exc}); name plain fields of the row, e.g. '{{question}}'."
        ) from exc


def _fill(prompt: str, template: str) -> str:
    """A plain prompt (or the user turns of chat messages) under ``template``."""
    if template == "auto":
        return prompt
    fields = template_fields(template)
    if len(fields) != 1:
        raise ClusteringError(
            f"the text template {template!r} reads the fields {fields}; a plain prompt (or "
            "chat messages) fills only one. Send each request as a row with those fields, "
            f"e.g. {{{', '.join(repr(f) + ': ...' for f in fields)}}}, the way the training "
            "data holds them."
        )
    return _format(template, {fields[0]: prompt})


def request_text(request: Request, template: str = "auto") -> str:
    """The text a training row or an inference request is clustered by (see module doc).

    May be empty for a row with no request fields: callers report that with the row's place
    (preprocessing counts them; :meth:`ClusterModel.assign_requests` names the request).
    """
    if isinstance(request, str):
        return _fill(unformat_prompt(request), template)
    if isinstance(request, Mapping):
        return _row_text(request, template)
    if isinstance(request, Sequence):
        return _fill(_chat_user_text(request), template)
    raise ClusteringError(
        f"a request must be a prompt string, a list of chat messages or a row (mapping), "
        f"got {type(request).__name__}."
    )


def dataset_row_view(dataset_config: Mapping[str, Any] | None
                     ) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
    """How a ``chat_template`` dataset's own settings name its turns, applied to a raw row:
    ``field_messages``, ``message_property_mappings`` (or the older ``message_field_role`` /
    ``message_field_content``) and ``roles`` (``{user: [customer], assistant: [agent]}``) turn
    each message into ``{"role": <user/assistant/...>, "content": ...}`` under ``messages``,
    so :func:`request_text` picks the user's turns as the chat template does. Other
    datasets' rows pass unchanged; clustering and the training lookup both call this, and
    inference requests arrive with the standard roles already."""
    cfg = dataset_config or {}
    if not str(cfg.get("type") or "").startswith("chat_template"):
        return lambda row: row
    field = cfg.get("field_messages") or "messages"
    mappings = dict(cfg.get("message_property_mappings") or {})
    role_key = mappings.get("role") or cfg.get("message_field_role") or "role"
    content_key_ = mappings.get("content") or cfg.get("message_field_content") or "content"
    canonical = {str(alias).lower(): str(role)
                 for role, aliases in (cfg.get("roles") or {}).items()
                 for alias in ([aliases] if isinstance(aliases, str) else aliases or [])}
    if (field, role_key, content_key_) == ("messages", "role", "content") and not canonical:
        return lambda row: row

    def view(row: Mapping[str, Any]) -> Mapping[str, Any]:
        turns = row.get(field)
        if not isinstance(turns, list):
            return row
        messages = []
        for turn in turns:
            if not isinstance(turn, Mapping):
                continue
            role = str(turn.get(role_key, ""))
            messages.append({"role": canonical.get(role.lower(), role),
                             "content": turn.get(content_key_)})
        return {**{k: v for k, v in row.items() if k != field}, "messages": messages}

    return view


def content_key(text: str) -> str:
    """Stable id of a row's content (sha256 hex of its text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def iter_rows(examples: datasets.Dataset | Iterable[Mapping[str, Any]]) -> Iterator[dict]:
    """Rows of a datasets.Dataset (read in batches: row-wise access is slow) or of a list."""
    if hasattr(examples, "iter") and hasattr(examples, "column_names"):
        for batch in examples.iter(batch_size=1000):
            names = list(batch)
            for values in zip(*(batch[n] for n in names)):
                yield dict(zip(names, values))
    else:
        yield from (dict(row) for row in examples)


def prompt_request(prompt: str, user_turn: tuple[str, str] | None = None) -> Request:
    """The request behind a prompt rendered by a tokenizer's chat template (e.g. decoded input
    ids): its user turns as chat messages, given ``user_turn`` = (header, end) that template
    puts around a user message; else the prompt itself (:func:`request_text` reads the alpaca
    and ChatML frames back)."""
    if user_turn is not None:
        header, end = user_turn
        pattern = re.escape(header) + "(.*?)" + (re.escape(end) if end else r"\Z")
        turns = re.findall(pattern, prompt, re.S)
        if turns:
            return [{"role": "user", "content": t} for t in turns]
    return prompt
