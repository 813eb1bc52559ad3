"""Tuning data: JSON Lines in three shapes, validated up front, split deterministically, hashed.

Accepted records (one JSON object per line; blank lines are skipped):

* ``{"prompt": "...", "completion": "..."}``: used as is.
* ``{"text": "...", "label": "..."}``: a classification example. The prompt comes from
  :data:`LABEL_TEMPLATE` and the completion is ``" " + label``; the label set is recorded so evaluation can
  score exact label matches and the model card lists it.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat. The last message must come from the
  assistant; it is the completion, and everything before it, rendered with the tokenizer's chat template, is
  the prompt.

A file mixes shapes only if every record has one of them. Errors name the line and the field
(:class:`DataError`); nothing is unpickled, and no record is silently dropped.

The validation split is a pure function of each record's content (a hash bucket), so it survives reordering
and appending lines; the data hash is the SHA-256 of the canonical records and is recorded in the model card.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LABEL_TEMPLATE = "Classify the intent of this request.\nRequest: {text}\nIntent:"
_ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """Invalid tuning data; the message names the file, line and field and says how to fix it."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    text: str | None = None  # the user's words (what noise augmentation corrupts); None for chats
    label: str | None = None  # text/label records

    def noisy_prompt(self, corrupt_text: Callable[[str], str]) -> str | None:
        """The prompt with the user's words corrupted (None when there are no free-text words to corrupt)."""
        if self.text is None:
            return None
        noisy = corrupt_text(self.text)
        return label_prompt(noisy) if self.label is not None else noisy


@dataclass
class TuningData:
    train: list[Example]
    val: list[Example]
    data_hash: str
    labels: list[str] = field(default_factory=list)  # sorted label set of text/label records
    source: str = ""

    def summary(self) -> dict[str, Any]:
        return {"train": len(self.train), "val": len(self.val), "data_hash": self.data_hash,
                "labels": len(self.labels), "source": self.source}


def label_prompt(text: str) -> str:
    return LABEL_TEMPLATE.format(text=text)


def text_of_label_prompt(prompt: str) -> str | None:
    """The user's text inside a prompt rendered with :data:`LABEL_TEMPLATE`, or None for any other prompt."""
    head, _, tail = LABEL_TEMPLATE.partition("{text}")
    if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail):
        return prompt[len(head):len(prompt) - len(tail)]
    return None


def _need_str(rec: dict[str, Any], key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def parse_record(rec: Any, where: str, chat_template: Callable[[list[dict[str, str]]], str] | None) -> Example:
    """One JSON value to an :class:`Example`, or a :class:`DataError` naming ``where`` and the field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt" in rec or "completion" in rec:
        prompt = _need_str(rec, "prompt", where)
        return Example(prompt, _need_str(rec, "completion", where), text=prompt)
    if "text" in rec or "label" in rec:
        text, label = _need_str(rec, "text", where), _need_str(rec, "label", where)
        if "\n" in label:
            raise DataError(f"{where}: field 'label' must be one line")
        return Example(label_prompt(text), " " + label.strip(), text=text, label=label.strip())
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: field 'messages' must be a list of at least 2 messages")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field 'messages[{j}]' must be {{'role': one of {sorted(_ROLES)}, "
                                f"'content': string}}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages' must end with the assistant's message (the completion)")
        if chat_template is None:
            raise DataError(f"{where}: chat records need a tokenizer with a chat template")
        try:
            prompt = chat_template(msgs[:-1])
        except Exception as e:  # the tokenizer's template rejects the conversation (e.g. roles must alternate)
            raise DataError(f"{where}: field 'messages': the chat template refused it: {e}") from None
        return Example(prompt, msgs[-1]["content"])
    raise DataError(f"{where}: a record needs 'prompt'+'completion', 'text'+'label' or 'messages'; "
                    f"got fields {sorted(rec)}")


def _bucket(ex: Example) -> float:
    h = hashlib.sha256(f"{ex.prompt}\x00{ex.completion}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split(examples: Iterable[Example], val_share: float) -> tuple[list[Example], list[Example]]:
    """Deterministic split by content hash: an example's side never depends on order or on other lines."""
    train: list[Example] = []
    val: list[Example] = []
    for ex in examples:
        (val if _bucket(ex) < val_share else train).append(ex)
    return train, val


def data_hash(examples: Iterable[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.completion], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_jsonl(path: str | Path, *, val_share: float = 0.1, val_path: str | Path | None = None,
               chat_template: Callable[[list[dict[str, str]]], str] | None = None,
               max_records: int = 1_000_000) -> TuningData:
    """Read and validate ``path``; split off ``val_share`` by content hash unless ``val_path`` is given."""
    examples = read_examples(path, chat_template=chat_template, max_records=max_records)
    if val_path is not None:
        train, val = examples, read_examples(val_path, chat_template=chat_template, max_records=max_records)
    else:
        train, val = split(examples, val_share)
    if not train:
        raise DataError(f"{path}: no training examples after the validation split; add data or lower val_share")
    if not val:
        raise DataError(f"{path}: no validation examples; add data, raise val_share or pass a validation file")
    labels = sorted({e.label for e in train + val if e.label is not None})
    return TuningData(train=train, val=val, data_hash=data_hash(examples if val_path is None else train + val),
                      labels=labels, source=str(path))


def read_examples(path: str | Path, *, chat_template: Callable[[list[dict[str, str]]], str] | None = None,
                  max_records: int = 1_000_000) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSON Lines file of training records")
    out: list[Example] = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            out.append(parse_record(rec, where, chat_template))
            if len(out) > max_records:
                raise DataError(f"{path}: more than {max_records} records; raise max_records or sample the data")
    if not out:
        raise DataError(f"{path}: no records")
    return out
