"""Writing a mapping file from an alignment, for the user to check and edit.

Pairs whose names differ become ``[[rule]]`` tables. Names that differ only in their numbers
(layer, expert, block) become one rule when every number of the reference name (and of the
transforms) is one of the candidate name's: ``trunk.3.sa.qp`` -> ``model.layers.3...q_proj``
for every layer is ``cand = 'trunk\\.(\\d+)\\.sa\\.qp'``, ``ref = "model.layers.{1}..."``.
Unpaired names are listed as commented-out ``ignore`` globs. A pair of names whose layout
differs between steps (a prefill tensor permuted, its one-token decode tensor reshaped) gets
a rule without transforms: a rule's transform applies at every step, while a pair without one
gets the layout that fits it at each step (align.layouts).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

from .mapping import glob_escape

if TYPE_CHECKING:
    from .pairs import Alignment

__all__ = ["mapping_text", "rules_text"]

_NUMBER = re.compile(r"(\d+)")


def _toml_string(text: str) -> str:
    """A TOML literal string when it can be one (regexes keep their backslashes)."""
    if "'" not in text and not any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return f"'{text}'"
    return json.dumps(text, ensure_ascii=False)


class _Entry(NamedTuple):
    cand: str
    ref: str
    cand_transform: str | None
    ref_transform: str | None
    how: str
    canonical: str | None
    confidence: float  #: the lowest of its pairs (1.0: names, tables, mapping)


class _Rule(NamedTuple):
    cand: str  #: regex
    ref: str  #: template
    transform: str | None
    ref_transform: str | None
    comment: str


def _skeleton(text: str | None) -> str | None:
    return None if text is None else _NUMBER.sub("#", text)


def _template(text: str | None, fills: dict[int, int]) -> str | None:
    """``text`` with its number j written as ``{fills[j]}``, braces escaped."""
    if text is None:
        return None
    out = []
    for i, part in enumerate(_NUMBER.split(text)):
        if i % 2 == 0:
            out.append(part.replace("{", "{{").replace("}", "}}"))
        else:
            out.append(f"{{{fills[i // 2]}}}" if i // 2 in fills else part)
    return "".join(out)


def _comment(group: Sequence[_Entry]) -> str:
    first = group[0]
    canonical = f" ({first.canonical}{', ...' if len(group) > 1 else ''})" \
        if first.canonical else ""
    confidence = min(e.confidence for e in group)
    sure = f", confidence {confidence:.2f}" if confidence < 1 else ""
    return f"{first.how}{canonical}{sure}, {len(group)} name{'s' if len(group) != 1 else ''}"


def _one_rule(group: Sequence[_Entry]) -> _Rule | None:
    """One rule for entries alike but for their numbers: each number that varies in the
    reference name or a transform must equal one that varies in the candidate name."""
    cand_numbers = [_NUMBER.findall(e.cand) for e in group]
    columns = [[n[i] for n in cand_numbers] for i in range(len(cand_numbers[0]))]
    varying = [i for i, column in enumerate(columns) if len(set(column)) > 1]
    fills: list[dict[int, int]] = []  # per other text: its number j -> candidate number i
    for texts in ([e.ref for e in group], [e.cand_transform for e in group],
                  [e.ref_transform for e in group]):
        numbers = [_NUMBER.findall(t or "") for t in texts]
        fill = {}
        for j in range(len(numbers[0])):
            column = [n[j] for n in numbers]
            if len(set(column)) > 1:
                follows = [i for i in varying if columns[i] == column]
                if not follows:
                    return None
                fill[j] = follows[0]
        fills.append(fill)
    groups = {i: k + 1 for k, i in enumerate(sorted({i for f in fills for i in f.values()}))}
    regex = []
    for i, part in enumerate(_NUMBER.split(group[0].cand)):
        if i % 2 == 0:
            regex.append(re.escape(part))
        elif i // 2 in varying:
            regex.append(r"(\d+)" if i // 2 in groups else r"\d+")
        else:
            regex.append(part)
    first = group[0]
    ref, cand_t, ref_t = ({j: groups[i] for j, i in f.items()} for f in fills)
    return _Rule("".join(regex), _template(first.ref, ref) or "",
                 _template(first.cand_transform, cand_t),
                 _template(first.ref_transform, ref_t), _comment(group))


def _generalise(group: Sequence[_Entry]) -> list[_Rule]:
    """One rule for the group if its names generalise, else one rule per name."""
    rule = _one_rule(group) if len(group) > 1 else None
    if rule is not None:
        return [rule]
    return [_Rule(re.escape(e.cand), _template(e.ref, {}) or "",
                  _template(e.cand_transform, {}), _template(e.ref_transform, {}),
                  _comment([e])) for e in group]


def _globs(names: Iterable[str]) -> list[str]:
    """Unique names; those alike but for some numbers as one glob, ``*`` for those numbers."""
    by_skeleton: dict[str, dict[str, None]] = {}
    for name in names:
        by_skeleton.setdefault(_NUMBER.sub("#", name), {})[name] = None
    out = []
    for members in by_skeleton.values():
        split = [_NUMBER.split(name) for name in members]
        glob = []
        for i, part in enumerate(split[0]):
            varies = i % 2 == 1 and len({parts[i] for parts in split}) > 1
            glob.append("*" if varies else glob_escape(part))
        out.append("".join(glob))
    return out


def _ignore_list(key: str, names: list[str]) -> list[str]:
    lines = [f"{key} = ["]
    lines += [f"  # {_toml_string(g)}," for g in _globs(names)]
    return lines + ["]"]


def _groups(entries: Iterable[_Entry]) -> list[list[_Entry]]:
    """Entries alike but for their numbers, together."""
    groups: dict[tuple[str | None, ...], list[_Entry]] = {}
    for e in entries:
        key = (_skeleton(e.cand), _skeleton(e.ref), _skeleton(e.cand_transform),
               _skeleton(e.ref_transform))
        groups.setdefault(key, []).append(e)
    return list(groups.values())


def _rule_lines(rule: _Rule, comment: str) -> list[str]:
    lines = ["[[rule]]", f"# {comment}", f"cand = {_toml_string(rule.cand)}",
             f"ref = {_toml_string(rule.ref)}"]
    if rule.transform:
        lines.append(f"transform = {_toml_string(rule.transform)}")
    if rule.ref_transform:
        lines.append(f"ref_transform = {_toml_string(rule.ref_transform)}")
    return lines


def rules_text(pairs: Iterable[tuple[str, str, str | None, str | None]],
               comment: str = "suggested") -> str:
    """``[[rule]]`` tables that would pair each (candidate name, reference name, candidate
    transform, reference transform), names alike but for their numbers as one rule."""
    entries = {p: _Entry(*p, "suggestion", None, 1.0) for p in pairs}
    rules = [r for group in _groups(entries.values()) for r in _generalise(group)]
    return "\n\n".join("\n".join(_rule_lines(r, comment)) for r in rules)


def _one_layout_per_name(entries: dict[tuple[str, str, str | None, str | None], _Entry]
                         ) -> dict[tuple[str, str, str | None, str | None], _Entry]:
    """Entries of one (candidate, reference) name pair whose transforms differ between steps
    as one entry without transforms (each step's layout is then found by its shapes)."""
    by_names: dict[tuple[str, str], list[_Entry]] = {}
    for e in entries.values():
        by_names.setdefault((e.cand, e.ref), []).append(e)
    out = {}
    for group in by_names.values():
        if len(group) > 1:
            low = min(group, key=lambda e: e.confidence)
            group = [low._replace(cand_transform=None, ref_transform=None,
                                  how=f"{low.how}, its layout found at each step")]
        out.update({(e.cand, e.ref, e.cand_transform, e.ref_transform): e for e in group})
    return out


def mapping_text(alignment: Alignment, *, reference: str | None = None,
                 candidate: str | None = None) -> str:
    """A TOML mapping file (docs/mapping.md) that reproduces ``alignment``'s pairs whose
    names differ, with the unpaired names as commented-out ignore globs."""
    entries: dict[tuple[str, str, str | None, str | None], _Entry] = {}
    for p in alignment.pairs:
        if p.ref.name == p.cand.name and not (p.ref_transform or p.cand_transform):
            continue
        key = (p.cand.name, p.ref.name, p.cand_transform, p.ref_transform)
        value = getattr(p, "confidence", None)  # pairs before structural pairing had none
        confidence = 1.0 if value is None else float(value)
        seen = entries.get(key)
        if seen is None or confidence < seen.confidence:
            entries[key] = _Entry(*key, p.how, p.canonical, confidence)
    entries = _one_layout_per_name(entries)
    lines = ["# lockstep mapping file (docs/mapping.md), written by `lockstep align --write`."]
    if reference or candidate:
        lines += [f"# reference: {reference or '?'}", f"# candidate: {candidate or '?'}"]
    lines += [
        "# Each [[rule]] pairs the candidate records whose name fully matches `cand` (a regex)",
        "# with the reference record `ref` names ({1}: the regex's first group), after the",
        "# transforms. Records with the same name in both dumps pair without a rule.",
        "",
        "# [tolerances]",
        "# \"model.layers.*.mlp.*\" = 1e-3    # glob on reference names = relative L2 error",
    ]
    for group in _groups(entries.values()):
        for rule in _generalise(group):
            lines += ["", *_rule_lines(rule, f"paired by {rule.comment}")]
    lines += ["", "[ignore]",
              "# records nothing paired: uncomment a glob to leave its records out"]
    lines += _ignore_list("ref", [r.name for r in alignment.ref_only])
    lines += _ignore_list("cand", [c.name for c in alignment.cand_only])
    return "\n".join(lines) + "\n"
