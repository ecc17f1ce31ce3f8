"""``lockstep weights MODEL CHECKPOINT``: does a loaded model hold its checkpoint's weights, and
where are they? (a thin shell over ``lockstep.check_loaded``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..engines.registry import kinds_with, spec_help, takes
from ..errors import UsageError
from ..extras import require
from .options import add_report_files, add_weight_mapping, engine_options, weight_rename
from .output import show

__all__ = ["register", "run"]

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
    w.add_argument("model", help=spec_help(module_tree=True) + " (an engine with a torch "
                                 "module tree: torch_module(), or .model, after load())")
    w.add_argument("checkpoint", help="checkpoint file or directory it should hold")
    w.add_argument("--dtype", default="float32", help=f"dtype of an {kinds_with('dtype')} model")
    w.add_argument("--device", default="cpu",
                   help=f"device of an {kinds_with('device')} model")
    w.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option, e.g. model=DIR for a py: engine (repeatable)")
    add_report_files(w, "also write the full report as JSON")
    w.add_argument("--rows", type=int, default=40, metavar="N",
                   help="tensors shown that are not equal (default 40; all in --json)")
    add_weight_mapping(w)
    w.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, check it against the checkpoint, print; exit 0 clean, 1 problems."""
    from ..checkpoint.weights import check_loaded
    from ..checkpoint.weights_render import LoadCheckView
    from ..engines import open_engine

    rename = weight_rename(args.mapping)  # a bad mapping file: before the model loads
    if not Path(args.checkpoint).exists():  # before a model load that may take minutes
        raise UsageError(f"{args.checkpoint}: no such file or directory (the checkpoint to "
                         "check the model against)")
    options = engine_options(args.model, args.dtype, args.opt)
    if takes(args.model, "device"):
        options["device"] = args.device
    engine = open_engine(args.model, **options)
    engine.load()
    try:
        torch = require("torch", "torch")
        model = engine.torch_module()  # the Engine API's module tree; else its .model
        if model is None:
            model = getattr(engine, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{args.model}: the {engine.name} engine has no torch model to "
                             f"check (torch_module() and .model give "
                             f"{type(model).__name__}); weights needs an engine with a torch "
                             f"nn.Module tree after load() ({kinds_with('module_tree')})")
        check = check_loaded(model, args.checkpoint, rename=rename)
    finally:
        engine.close()
    show(LoadCheckView(check, rows=args.rows), args)
    return EXIT_OK if check and check.placement else EXIT_PROBLEMS
