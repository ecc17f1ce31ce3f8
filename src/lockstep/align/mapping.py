"""Mapping files: the user's own rules for pairing a candidate's records with the reference's.

A mapping file is TOML (docs/mapping.md)::

    ignore = ["*.dropout"]                  # or [ignore] ref = [...] cand = [...]

    [tolerances]
    "model.layers.*.mlp.*" = 1e-3           # glob on reference names: relative L2 tolerance

    [[rule]]
    cand = 'trunk\\.(\\d+)\\.sa\\.qkv'          # regex, full match on candidate names
    ref = "model.layers.{1}.self_attn.q_proj"   # {1}: the first group ({0}: the whole name)
    transform = "slice(-1, 0, 64)"          # on the candidate tensor (align/transforms.py)
    ref_transform = "cast(float32)"         # on the reference tensor
    tolerance = 1e-3

Every rule whose regex matches a candidate name gives a pair, so one fused candidate record
can pair with several reference records. Templates may also fill transforms
(``"block(16, {2})"``). Everything is checked when the file is loaded: a mistake is a
UsageError naming ``file:line:column``.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import string
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .transforms import parse_transform

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["MappingHit", "MappingRule", "MappingFile", "load_mapping", "glob_escape"]

_RULE_KEYS = ("cand", "ref", "transform", "ref_transform", "tolerance")
_TOP_KEYS = ("rule", "ignore", "tolerances", "shard")
_SHARD_RULES = ("col", "row", "replicated")


def glob_escape(text: str) -> str:
    """``text`` as a glob that matches only itself."""
    return re.sub(r"([*?\[\]])", r"[\1]", text)


@dataclass(frozen=True)
class MappingHit:
    """One reference record a candidate record pairs with, by one rule."""

    ref_name: str  #: the reference record name the candidate record pairs with
    cand_transform: str | None  #: transform pipeline applied to the candidate tensor
    ref_transform: str | None  #: applied to the reference tensor
    rule: int  #: index of the rule in the file (0: the first ``[[rule]]``)


@dataclass(frozen=True)
class MappingRule:
    """One ``[[rule]]`` of a mapping file."""

    index: int  #: 0 for the file's first rule
    line: int  #: where its ``[[rule]]`` header is
    cand: re.Pattern[str]  #: full match on candidate names
    ref: str  #: template of the reference name: {1} the first group, {name} a named group
    transform: str | None = None  #: template of the candidate's transform
    ref_transform: str | None = None  #: template of the reference's transform
    tolerance: float | None = None  #: relative L2 tolerance for the pairs of this rule

    def hit(self, name: str) -> MappingHit | None:
        """The pair this rule makes for a candidate name, or None if it does not match."""
        m = self.cand.fullmatch(name)
        if m is None:
            return None
        args = [m.group(0), *(g or "" for g in m.groups())]
        named = {k: v or "" for k, v in m.groupdict().items()}

        def fill(template: str | None) -> str | None:
            return template.format(*args, **named) if template else None

        return MappingHit(self.ref.format(*args, **named), fill(self.transform),
                          fill(self.ref_transform), self.index)

    @property
    def ref_glob(self) -> str:
        """The reference names this rule can produce, as a glob (each field a ``*``)."""
        return "".join(glob_escape(literal) + ("*" if field is not None else "")
                       for literal, field, _, _ in string.Formatter().parse(self.ref))


@dataclass(frozen=True)
class MappingFile:
    """A loaded mapping file; see the module docstring and docs/mapping.md."""

    path: str
    rules: tuple[MappingRule, ...] = ()
    ignore_ref: tuple[str, ...] = ()  #: globs on reference names left out of the comparison
    ignore_cand: tuple[str, ...] = ()  #: and on candidate names
    per_name: tuple[tuple[str, float], ...] = ()  #: the ``[tolerances]`` table, in order
    #: the ``[shard]`` table: (glob on record names, rule, dim), how a multi-rank side's
    #: records merge across ranks (align.unshard)
    shards: tuple[tuple[str, str, int], ...] = ()

    def lookup(self, cand_name: str) -> list[MappingHit]:
        """Every rule's pair for a candidate name, in file order (empty: no rule matches)."""
        return [hit for hit in (rule.hit(cand_name) for rule in self.rules) if hit is not None]

    def ignored(self, name: str, side: str) -> bool:
        """Whether an ``ignore`` glob of ``side`` ("ref" or "cand") matches the name."""
        if side not in ("ref", "cand"):
            raise ValueError(f"side must be 'ref' or 'cand', not {side!r}")
        globs = self.ignore_ref if side == "ref" else self.ignore_cand
        return any(fnmatch.fnmatchcase(name, g) for g in globs)

    def tolerances(self) -> list[tuple[str, float]]:
        """(glob on reference names, relative tolerance): the rules' own, then the
        ``[tolerances]`` table's; the first that matches a name applies."""
        own = [(rule.ref_glob, rule.tolerance) for rule in self.rules
               if rule.tolerance is not None]
        return own + list(self.per_name)

    def shard(self, name: str) -> tuple[str, int] | None:
        """The ``[shard]`` rule (rule, dim) of the first glob that matches ``name``."""
        return next(((rule, dim) for glob, rule, dim in self.shards
                     if fnmatch.fnmatchcase(name, glob)), None)

    def where(self, rule: int) -> str:
        """``file:line`` of a rule, for reports."""
        return f"{self.path}:{self.rules[rule].line}"


class _Source:
    """The file's text, to say which line and column a key or value is on (tomllib does not
    say where values were)."""

    _KEY = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*=\s*""")

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.keys: dict[tuple[str, int, str], tuple[int, int]] = {}
        self.headers: dict[tuple[str, int], int] = {}
        section, index = "", 0
        arrays: dict[str, int] = {}  # [[name]] tables seen so far, by name
        for number, line in enumerate(self.lines, 1):
            table = re.match(r"\s*\[\[\s*([^\]]+?)\s*\]\]|\s*\[\s*([^\]]+?)\s*\]", line)
            if table:
                section, index = table.group(1) or table.group(2), 0
                if table.group(1):
                    index = arrays[section] = arrays.get(section, -1) + 1
                self.headers.setdefault((section, index), number)
                continue
            key = self._KEY.match(line)
            if key:
                name = key.group(1).strip("\"'")
                self.keys.setdefault((section, index, name), (number, key.end() + 1))

    def error(self, where: tuple[str, int, str], message: str,
              offset: int | None = None) -> UsageError:
        """``file:line:col: message`` at the value of key ``where`` = (table, index, key), or
        at the table's header; ``offset`` counts into a single-line string value."""
        if where in self.keys:
            line, col = self.keys[where]
            if offset is not None:
                col += 1 + offset  # past the opening quote
        else:
            line, col = self.headers.get(where[:2], 1), 1
        return UsageError(f"{self.path}:{line}:{col}: {message}")


def _toml_error(path: str, text: str, exc: Exception) -> UsageError:
    message = str(exc)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        where = f"{m.group(1)}:{m.group(2)}"
        message = message[:m.start()]
    else:
        where = str(max(1, len(text.splitlines())))
        message = re.sub(r"\s*\(at end of document\)$", "", message)
    return UsageError(f"{path}:{where}: not valid TOML: {message}; see docs/mapping.md for "
                      "the format")


def _fields(template: str) -> list[str]:
    """The replacement fields of a template, with any format spec or conversion (``{1:>3}``,
    ``{1!r}``) as written; ValueError for unbalanced braces."""
    return [field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            for _, field, spec, conversion in string.Formatter().parse(template)
            if field is not None]


def _check_template(src: _Source, where: tuple[str, int, str], template: str,
                    pattern: re.Pattern[str]) -> None:
    key = where[2]
    try:
        fields = _fields(template)
    except ValueError:
        raise src.error(where, f"{key} {template!r}: unbalanced braces; write a literal "
                               "brace as {{ or }}") from None
    for field in fields:
        if (field.isdigit() and int(field) <= pattern.groups) or field in pattern.groupindex:
            continue
        groups = pattern.groups
        raise src.error(where, f"{key} {template!r}: {{{field}}} is not a group of the cand "
                               f"regex, which has {groups} group{'s' if groups != 1 else ''}; "
                               "write {1} for the first group ({0} is the whole name)")


def _check_transform(src: _Source, where: tuple[str, int, str], template: str,
                     pattern: re.Pattern[str]) -> None:
    _check_template(src, where, template, pattern)
    spec = template.format(*["0"] * (pattern.groups + 1),
                           **dict.fromkeys(pattern.groupindex, "0"))
    try:
        parse_transform(spec)  # checks each step's arguments, sizes and dtypes
    except UsageError as exc:
        reason = str(exc).split(": ", 1)[-1]  # without parse_transform's own prefix
        raise src.error(where, f"{where[2]} {template!r}: {reason}") from None


def _string(src: _Source, where: tuple[str, int, str], value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise src.error(where, f"{where[2]} must be a non-empty string, got {value!r}")
    return value


def _tolerance(src: _Source, where: tuple[str, int, str], value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 0:
        raise src.error(where, f"{what} must be a number >= 0 (a relative L2 error such as "
                               f"1e-3), got {value!r}")
    return float(value)


def _rule(src: _Source, index: int, table: Any) -> MappingRule:
    if not isinstance(table, dict):
        raise src.error(("", 0, "rule"), "rule must be written as [[rule]] tables")
    def at(key: str) -> tuple[str, int, str]:
        return ("rule", index, key)

    unknown = [k for k in table if k not in _RULE_KEYS]
    if unknown:
        raise src.error(at(unknown[0]), f"unknown key {unknown[0]!r} in a [[rule]]; "
                                        f"a rule has {', '.join(_RULE_KEYS)}")
    for key in ("cand", "ref"):
        if key not in table:
            raise src.error(("rule", index, ""), f"this [[rule]] has no {key} = \"...\"; every "
                                             "rule needs cand (a regex) and ref (a template)")
    cand = _string(src, at("cand"), table["cand"])
    try:
        pattern = re.compile(cand)
    except re.error as exc:
        literal = src.keys.get(at("cand"))
        offset = exc.pos if literal and src.lines[literal[0] - 1][literal[1] - 1:].startswith(
            f"'{cand}'") else None
        raise src.error(at("cand"), f"cand regex {cand!r} is not valid: {exc.msg}; fix the "
                                    "regex (in single quotes backslashes stay as typed)",
                        offset) from None
    ref = _string(src, at("ref"), table["ref"])
    _check_template(src, at("ref"), ref, pattern)
    transforms = {}
    for key in ("transform", "ref_transform"):
        if key in table:
            transforms[key] = _string(src, at(key), table[key])
            _check_transform(src, at(key), transforms[key], pattern)
    tolerance = _tolerance(src, at("tolerance"), table["tolerance"], "tolerance") \
        if "tolerance" in table else None
    return MappingRule(index, src.headers.get(("rule", index), 1), pattern, ref,
                       transforms.get("transform"), transforms.get("ref_transform"), tolerance)


def _globs(src: _Source, where: tuple[str, int, str], value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise src.error(where, f"{where[2]} must be a list of glob strings, e.g. "
                               f"[\"*.dropout\"], got {value!r}")
    return tuple(value)


def _shards(src: _Source, table: Any) -> tuple[tuple[str, str, int], ...]:
    if not isinstance(table, dict):
        raise src.error(("", 0, "shard"), "shard must be a table: [shard] \"GLOB\" = "
                                          "\"col:-1\" (or \"row\", \"replicated\")")
    out = []
    for glob, value in table.items():
        rule, _, dim = value.partition(":") if isinstance(value, str) else ("", "", "")
        default = "-1" if rule == "col" else "0"
        if rule not in _SHARD_RULES or not re.fullmatch(r"-?\d{1,3}", dim or default):
            raise src.error(("shard", 0, glob), f"the shard rule for {glob!r} must be "
                                                f"\"col:DIM\", \"row\" or \"replicated\", "
                                                f"got {value!r}")
        out.append((glob, rule, int(dim or default)))
    return tuple(out)


def load_mapping(path: str | os.PathLike[str]) -> MappingFile:
    """Read and check a mapping file; UsageError naming ``file:line:col`` for any mistake."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read the mapping file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, text, exc) from None
    src = _Source(path, text)
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise src.error(("", 0, unknown[0]), f"unknown key {unknown[0]!r}; a mapping file "
                                             "has [[rule]] tables, ignore, [tolerances] and "
                                             "[shard]")
    rules = data.get("rule", [])
    if not isinstance(rules, list):
        raise src.error(("", 0, "rule"), "rule must be written as [[rule]] tables")
    ignore = data.get("ignore", [])
    if isinstance(ignore, dict):
        extra = [k for k in ignore if k not in ("ref", "cand")]
        if extra:
            raise src.error(("ignore", 0, extra[0]), f"unknown key {extra[0]!r} in [ignore]; "
                                                     "it has ref and cand")
        ignore_ref = _globs(src, ("ignore", 0, "ref"), ignore.get("ref", []))
        ignore_cand = _globs(src, ("ignore", 0, "cand"), ignore.get("cand", []))
    else:
        ignore_ref = ignore_cand = _globs(src, ("", 0, "ignore"), ignore)
    tolerances = data.get("tolerances", {})
    if not isinstance(tolerances, dict):
        raise src.error(("", 0, "tolerances"), "tolerances must be a table: "
                                               "[tolerances] \"GLOB\" = NUMBER")
    per_name = tuple((k, _tolerance(src, ("tolerances", 0, k), v, f"the tolerance for {k!r}"))
                     for k, v in tolerances.items())
    return MappingFile(path, tuple(_rule(src, i, r) for i, r in enumerate(rules)),
                       ignore_ref, ignore_cand, per_name, _shards(src, data.get("shard", {})))
