"""The request text of a row or a prompt: what is embedded and clustered.

Every path that needs a cluster computes the text with :func:`example_text` (preprocessing,
the training lookup, generation, lm-eval, usage reports), so one request gets one cluster.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ClusteringError

if TYPE_CHECKING:
    import datasets

_CHAT_KEYS = ("messages", "conversations", "conversation")
_USER_ROLES = {"user", "human"}
_PROMPT_KEYS = ("instruction", "question", "prompt", "query", "text")
_INPUT_KEYS = ("input", "context")


class _EmptyMissing(dict):
    def __missing__(self, key: str) -> str:
        return ""


def check_template(template: str) -> None:
    """Fail early (not on row 10,000) on a malformed format string."""
    if template == "auto":
        return
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
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


def _as_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _chat_user_text(turns: Sequence[Any]) -> str:
    parts = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            continue
        role = str(turn.get("role", turn.get("from", ""))).lower()
        if role in _USER_ROLES:
            parts.append(_as_text(turn.get("content", turn.get("value"))))
    return "\n".join(p for p in parts if p)


def example_text(example: Mapping[str, Any], template: str = "auto") -> str:
    """The text that represents a row for clustering: the request, never the answer.

    The paper clusters on the sequence an input *asks*, so that at inference, where no
    answer exists, the same text (and thus the same cluster) can be computed.
    """
    if template != "auto":
        values = _EmptyMissing({k: _as_text(v) for k, v in example.items()})
        return template.format_map(values).strip()
    for key in _CHAT_KEYS:
        turns = example.get(key)
        if isinstance(turns, list) and turns:
            return _chat_user_text(turns)
    prompt = next((_as_text(example[k]) for k in _PROMPT_KEYS if _as_text(example.get(k))), "")
    extra = next((_as_text(example[k]) for k in _INPUT_KEYS if _as_text(example.get(k))), "")
    return "\n".join(p for p in (prompt, extra) if p)


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



#: What a request can be at inference: a plain prompt, chat messages, or a row in the
#: training data's own format.
Request = str | Sequence[Mapping[str, Any]] | Mapping[str, Any]


def request_text(request: Request, template: str = "auto") -> str:
    """The request text of an inference request, the same text :func:`example_text` gives the
    training row it corresponds to.

    Provisional: plain prompts and chat messages map onto the auto template's fields; see the
    consistency work on custom templates.
    """
    if isinstance(request, str):
        row: Mapping[str, Any] = {"instruction": request}
    elif isinstance(request, Mapping):
        row = request
    else:
        row = {"messages": list(request)}
    return example_text(row, template)


# axolotl's alpaca prompt (AlpacaPrompter), with and without an input.
_ALPACA_PROMPT = re.compile(
    r"### Instruction:\n(?P<instruction>.*?)\n\n(?:### Input:\n(?P<input>.*?)\n\n)?### Response:",
    re.S,
)


def prompt_request(prompt: str, user_turn: tuple[str, str] | None = None) -> Request:
    """The request behind a prompt already formatted for the model (e.g. decoded input ids),
    to pass to :func:`request_text`: the user turns when ``user_turn`` = (header, end) of the
    chat template's user message occurs, else the instruction/input of an alpaca prompt, else
    the prompt itself."""
    if user_turn is not None:
        header, end = user_turn
        pattern = re.escape(header) + "(.*?)" + (re.escape(end) if end else "$")
        turns = re.findall(pattern, prompt, re.S)
        if turns:
            return [{"role": "user", "content": t} for t in turns]
    match = _ALPACA_PROMPT.search(prompt)
    if match:
        return {"instruction": match["instruction"], "input": match["input"] or ""}
    return prompt
