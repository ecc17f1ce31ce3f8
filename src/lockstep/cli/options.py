"""Engine options from the command line: ``--ref-opt``, ``--cand-opt``, ``--opt``."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ..engines.registry import takes
from ..errors import UsageError

__all__ = ["engine_options", "int_list", "add_weight_mapping", "weight_rename",
           "add_report_files"]


def engine_options(spec: str, dtype: str, opts: Sequence[str] = ()) -> dict[str, Any]:
    """Options for the engine a spec names: ``dtype`` for those that take one (the engine
    registry says which), then each ``KEY=VALUE`` (numbers, true/false and none read as
    such)."""
    out: dict[str, Any] = {"dtype": dtype} if takes(spec, "dtype") else {}
    for opt in opts:
        key, sep, text = opt.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"engine option {opt!r} should look like KEY=VALUE, e.g. "
                             "bug=wrong_kv_slot")
        value: Any = {"true": True, "false": False, "none": None}.get(text.lower(), text)
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def int_list(text: str) -> list[int]:
    """``1,2,3`` or ``1 2 3`` as integers (token ids, prompt lengths), for argparse."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, e.g. 1,2,3, got {text!r}") from None


def add_weight_mapping(parser: Any) -> None:
    """``--mapping FILE`` for the commands that pair weights (weights, inspect --against)."""
    parser.add_argument("--mapping", metavar="FILE",
                        help="mapping file (docs/mapping.md): rules whose cand regex matches "
                             "the model's (or A's) tensor names and whose ref template is the "
                             "checkpoint's name; ignore globs leave tensors out")


def weight_rename(path: str | None) -> Any:
    """The renaming a ``--mapping`` file gives weight names, or None without one."""
    if not path:
        return None
    from ..align.mapping import load_mapping
    from ..checkpoint.weight_mapping import weight_renamer

    return weight_renamer(load_mapping(path))


def add_report_files(parser: Any, json_help: str = "also write the report as JSON") -> None:
    """An option per file face of the report (``report.faces``): ``--json FILE``,
    ``--html FILE``..., written by ``output.show``."""
    from ..report.faces import FACES

    for face in FACES:
        parser.add_argument(f"--{face.name}", metavar="FILE",
                            help=json_help if face.name == "json" else face.help)


def add_selection(parser: Any) -> None:
    """``--select GLOB``, ``--exclude GLOB``, ``--layers 0-3,10``: which records to keep."""
    parser.add_argument("--select", action="append", metavar="GLOB",
                        help="record only names matching this glob, e.g. 'model.layers.*.mlp' "
                             "(repeatable; input_ids always)")
    parser.add_argument("--exclude", action="append", metavar="GLOB",
                        help="do not record names matching this glob (repeatable)")
    parser.add_argument("--layers", metavar="LIST",
                        help="record only these layers, e.g. 0-3,10 (records of no layer, "
                             "such as the embeddings and logits, are kept)")


def selection(args: Any) -> dict[str, Any]:
    """The ``add_selection`` options as ``capture``'s keyword arguments."""
    from ..capture.selection import parse_layers

    return {"include": args.select, "exclude": args.exclude,
            "layers": None if args.layers is None else parse_layers(args.layers)}
