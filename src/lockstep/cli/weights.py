"""``lockstep weights MODEL CHECKPOINT``: does a loaded model hold its checkpoint's weights, and
where are they? (a thin shell over ``lockstep.check_loaded``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..engines.registry import kinds_with, spec_help, takes
from ..errors import MissingExtraError, UsageError
from .options import add_report_files, add_weight_mapping, weight_rename, write_reports

__all__ = ["register", "run", "render_check"]

EXIT_OK, EXIT_PROBLEMS = 0, 1


def register(sub: Any) -> None:
    """Add the ``weights`` subcommand."""
    w = sub.add_parser(
        "weights", help="check a loaded model's weights against its checkpoint, and where "
                        "they are placed",
        description="Loads the model through its engine and pairs every parameter and buffer "
                    "with the checkpoint's tensors (any format inspect reads): equal, "
                    "different, a fresh random init (never loaded), missing; then maps the "
                    "device and dtype of every module. Exit code: 0 every tensor equal and "
                    "no module placed apart from the rest, 1 otherwise, 2 error.")
    w.add_argument("model", help=spec_help(module_tree=True) + " (an engine whose .model is "
                                 "a torch nn.Module after load())")
    w.add_argument("checkpoint", help="checkpoint file or directory it should hold")
    w.add_argument("--dtype", default="float32", help=f"dtype of an {kinds_with('dtype')} model")
    w.add_argument("--device", default="cpu",
                   help=f"device of an {kinds_with('device')} model")
    add_report_files(w, "also write the full report as JSON")
    w.add_argument("--rows", type=int, default=40, metavar="N",
                   help="tensors shown that are not equal (default 40; all in --json)")
    add_weight_mapping(w)
    w.set_defaults(handler=run)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_check(check: Any, *, rows: int = 40) -> list[Any]:
    """Renderables for a LoadCheck: verdict, tensors not equal, layers, placement."""
    from rich.table import Table
    from rich.text import Text

    from ..display import safe, text

    problems = check.problems
    placement = check.placement
    if check and placement:
        verdict = Text(f"PASS  all {len(check.params)} tensors equal to the checkpoint; every "
                       f"module on {placement.device}, {placement.dtype}", style="bold green")
    else:
        words = [f"{len(problems)} of {len(check.params)} tensors not equal"] if problems else []
        if check.not_loaded:
            words.append("not loaded: " + safe(", ".join(check.not_loaded)))
        if not placement:
            words.append(f"{len(placement.outliers)} modules placed apart from the rest")
        verdict = Text("FAIL  " + "; ".join(words), style="bold red")
    out: list[Any] = [verdict, text(f"checkpoint: {check.checkpoint} ({check.kind})")]
    if problems:
        table = Table(title="tensors not equal to the checkpoint"
                      + (f" (first {rows} of {len(problems)})" if len(problems) > rows else ""))
        table.add_column("tensor", overflow="fold")
        table.add_column("dtype (ckpt)")
        table.add_column("rel L2")
        table.add_column("status", min_width=20)
        for p in problems[:rows]:
            table.add_row(text(p.name), text(f"{p.dtype or '-'} ({p.checkpoint_dtype or '-'}"
                                             + (f", {p.transform})" if p.transform else ")")),
                          _fmt(p.rel_l2), text(p.status + (f": {p.note}" if p.note else "")),
                          style="red" if p.status != "different" else "yellow")
        out.append(table)
    layers = Table(title="by layer")
    for col in ("layer", "tensors", "equal", "other", "verdict"):
        layers.add_column(col, justify="right" if col in ("tensors", "equal") else "left")
    loaded = [s for s in check.layers if s.verdict == "loaded"]
    for s in check.layers:
        if s.verdict != "loaded":
            other = ", ".join(f"{n} {k}" for k, n in s.counts.items() if k != "equal")
            layers.add_row(text(s.layer), str(s.tensors), str(s.counts.get("equal", 0)), other,
                           s.verdict, style="red")
    if loaded:  # one row for all the layers that are fine
        n = sum(s.tensors for s in loaded)
        layers.add_row(f"{'all' if len(loaded) == len(check.layers) else 'the other'} "
                       f"{len(loaded)} layers and modules", str(n), str(n), "-", "loaded")
    out.append(layers)
    groups = Table(title=f"placement (majority: {placement.device}, {placement.dtype})")
    for col in ("device", "dtype", "modules", "parameters"):
        groups.add_column(col, justify="right" if col in ("modules", "parameters") else "left")
    for g in placement.groups():
        apart = g["device"] != placement.device or g["dtype"] != placement.dtype
        groups.add_row(g["device"], g["dtype"], str(g["modules"]), f"{g['params']:,}",
                       style="red" if apart else None)
    out.append(groups)
    if placement.outliers:
        table = Table(title="modules placed apart from the rest")
        for col in ("module", "device", "dtype", "parameters", "why"):
            table.add_column(col)
        for m in placement.outliers[:rows]:
            table.add_row(text(m.name or "(root)"), m.device, m.dtype, f"{m.params:,}", m.outlier,
                          style="red")
        out.append(table)
    return out


def run(args: argparse.Namespace) -> int:
    """Load the model, check it against the checkpoint, print; exit 0 clean, 1 problems."""
    from rich.console import Console

    from ..checkpoint.loaded import check_loaded
    from ..engines import open_engine

    rename = weight_rename(args.mapping)  # a bad mapping file: before the model loads
    if not Path(args.checkpoint).exists():  # before a model load that may take minutes
        raise UsageError(f"{args.checkpoint}: no such file or directory (the checkpoint to "
                         "check the model against)")
    options = {key: value for key, value in (("dtype", args.dtype), ("device", args.device))
               if takes(args.model, key)}
    engine = open_engine(args.model, **options)
    engine.load()
    try:
        model = getattr(engine, "model", None)
        try:
            import torch
        except ImportError:
            raise MissingExtraError("torch", "torch") from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{args.model}: the {engine.name} engine has no torch model to "
                             f"check (its .model is {type(model).__name__}); weights needs an "
                             "engine whose .model is a torch nn.Module after load() "
                             f"({kinds_with('module_tree')})")
        check = check_loaded(model, args.checkpoint, rename=rename)
    finally:
        engine.close()
    console = Console()
    for item in render_check(check, rows=args.rows):
        console.print(item)
    write_reports(args, "weights", check.to_json)
    return EXIT_OK if check and check.placement else EXIT_PROBLEMS
