"""The ``lockstep`` command: a thin shell over the public API."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from .._version import __version__
from ..engines.registry import kinds_epilog, kinds_with, recording, spec_help, takes
from ..errors import LockstepError, UsageError
from . import output
from .options import (
    add_report_files,
    add_selection,
    add_weight_mapping,
    int_list,
    selection,
    weight_rename,
)
from .options import engine_options as _engine_options

__all__ = ["main"]

EXIT_OK, EXIT_DIVERGED, EXIT_ERROR, EXIT_INCOMPLETE, EXIT_INTERNAL = 0, 1, 2, 3, 4
_VERDICT_EXIT = {"match": EXIT_OK, "drift": EXIT_OK, "diverged": EXIT_DIVERGED,
                 "incomplete": EXIT_INCOMPLETE}




def _compare_options(c: argparse.ArgumentParser) -> None:
    add_report_files(c, "also write the JSON report (docs/report.md)")
    c.add_argument("--rtol", type=float, help="one relative-L2 tolerance for every pair")
    c.add_argument("--tol", action="append", metavar="PATTERN=X",
                   help="tolerance for names matching a glob, e.g. 'model.layers.*.mlp*=1e-3'")
    c.add_argument("--all", action="store_true", help="show every pair, not a window")
    c.add_argument("--rows", type=int, default=40, help="pairs shown around the divergence")
    c.add_argument("--mapping", metavar="FILE", help="mapping file (docs/mapping.md): rules "
                   "that pair differently named records, ignores, tolerances")


def _batch_options(c: argparse.ArgumentParser, command: str) -> None:
    c.add_argument("--batch", action="store_true",
                   help="run the candidate on every prompt as one batch" if command == "diff"
                   else "run the engine on every prompt as one batch (docs/batching.md)")
    c.add_argument("--padding", choices=("left", "right"), default="left",
                   help="where the batch pads the shorter prompts (default left)")
    c.add_argument("--join-at", type=int, metavar="STEP",
                   help="continuous batching: the last prompt joins the batch at this step, "
                        "while the others decode")


def _prompts(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the prompt texts, the prompt token lists): lists with --batch, one prompt without."""
    prompts, tokens = args.prompt, args.tokens
    given = len(prompts or tokens or ())
    if not args.batch:
        if given > 1:
            raise UsageError("several prompts need --batch")
        if args.join_at is not None:
            raise UsageError("--join-at needs --batch")
        return (prompts[0] if prompts else None), (tokens[0] if tokens else None)
    if given < 2:
        raise UsageError("--batch needs two or more prompts: repeat --prompt or --tokens")
    return prompts, tokens


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lockstep",
        description="Run an inference engine beside a trusted reference and find the first "
                    "operation where they part.")
    p.add_argument("--version", action="version", version=f"lockstep {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an internal error (a bug in lockstep)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compare", help="compare a candidate dump with a reference dump",
                       description="Exit code: 0 match or drift, 1 diverged, 2 error, 3 incomplete "
                                   "(a decisive record was not compared).")
    c.add_argument("reference", help="reference dump directory")
    c.add_argument("candidate", help="candidate dump directory")
    _compare_options(c)

    df = sub.add_parser("diff", help="run a reference and a candidate engine, then compare",
                        description="Exit code: 0 match or drift, 1 diverged, 2 error, "
                                    "3 incomplete (a decisive record was not compared).",
                        epilog=kinds_epilog(recordings=True))
    df.add_argument("reference", help=spec_help(recordings=True))
    df.add_argument("candidate", help="engine spec, as for the reference")
    src = df.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (tokenized by the "
                     "reference); repeat it with --batch")
    src.add_argument("--tokens", type=int_list, action="append",
                     help="prompt token ids, e.g. 1,2,3; repeat it with --batch")
    _batch_options(df, "diff")
    df.add_argument("--decode", type=int, default=0, metavar="N", help="greedy decode steps")
    df.add_argument("--free-running", action="store_true",
                    help="let the candidate feed its own tokens (default: the reference's)")
    df.add_argument("--ref-dtype", default="float32",
                    help=f"dtype of an {kinds_with('dtype')} reference")
    df.add_argument("--cand-dtype", default="float32",
                    help=f"dtype of an {kinds_with('dtype')} candidate")
    df.add_argument("--ref-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine option for the reference (repeatable)")
    df.add_argument("--cand-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine option for the candidate, e.g. bug=wrong_kv_slot for "
                         "zoo: (repeatable)")
    df.add_argument("--out", default="lockstep-diff", help="where both dumps are kept")
    add_selection(df)
    df.add_argument("--no-replay", action="store_true",
                    help="do not re-run the reference's ops on the candidate's inputs (the "
                         "dual test) around the divergence")
    _compare_options(df)

    rp = sub.add_parser("replay", help="the dual test on dumps recorded earlier: re-run the "
                                       "reference engine's ops on the candidate's inputs",
                        description="Exit codes as for compare.")
    rp.add_argument("engine", help="the reference engine the reference dump came from; "
                                   + spec_help(module_tree=True))
    rp.add_argument("reference", help="reference dump directory")
    rp.add_argument("candidate", help="candidate dump directory")
    rp.add_argument("--at", metavar="NAME", help="replay this reference record's op (default: "
                                                 "the first divergence)")
    rp.add_argument("--ref-dtype", default="float32",
                    help=f"dtype of an {kinds_with('dtype')} engine")
    rp.add_argument("--ref-opt", action="append", default=[], metavar="KEY=VALUE")
    rp.add_argument("--cand-engine", metavar="SPEC",
                    help="also run the candidate's ops on the reference's inputs (the other "
                         f"way), with this engine ({kinds_with('module_tree')}; the options its "
                         "dump's metadata names, such as its dtype, are reused)")
    rp.add_argument("--cand-opt", action="append", default=[], metavar="KEY=VALUE")
    _compare_options(rp)

    cap = sub.add_parser("capture", help="run an engine on a prompt and record it",
                         description="Records the prefill as step 0 and N greedy decode steps.",
                         epilog=kinds_epilog())
    cap.add_argument("engine", help=spec_help())
    src = cap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (the model's tokenizer "
                     "is used); repeat it with --batch")
    src.add_argument("--tokens", type=int_list, action="append",
                     help="prompt token ids, e.g. 1,2,3; repeat it with --batch")
    _batch_options(cap, "capture")
    cap.add_argument("--decode", type=int, default=0, metavar="N", help="greedy decode steps")
    cap.add_argument("--out", required=True, help="dump directory to create")
    cap.add_argument("--dtype", default="float32",
                     help=f"dtype of an {kinds_with('dtype')} engine: float32, bfloat16, "
                          "float16, float64")
    cap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                     help="an engine option, e.g. bug=wrong_kv_slot for zoo: (repeatable)")
    cap.add_argument("--device", default="cpu",
                     help=f"torch device of an {kinds_with('device')} engine (default cpu)")
    cap.add_argument("--stats-only", action="store_true", help="keep statistics, not data")
    cap.add_argument("--overwrite", action="store_true", help="replace an existing dump")
    add_selection(cap)
    cap.add_argument("--dry-run", action="store_true",
                     help="write nothing: run once and print the bytes each step would take")

    r = sub.add_parser("run", help="record an unmodified Python program",
                       usage="lockstep run --out DIR [options] -- python program.py [args]")
    r.add_argument("--out", required=True, help="dump directory to create")
    r.add_argument("--watch", action="append", default=[], metavar="pkg.mod:Class",
                   help="watch instances of this module class (default: the outermost "
                        "module the program calls)")
    r.add_argument("--trace", action="append", default=[], metavar="pkg.mod:func",
                   help="record arguments and results of this function")
    r.add_argument("--step-at", action="append", default=[], metavar="pkg.mod:func",
                   help="each call of this function starts a step (engines with no module "
                        "tree: the function that runs one forward)")
    add_selection(r)
    r.add_argument("--include", action="append", dest="select", metavar="GLOB",
                   help=argparse.SUPPRESS)  # the older spelling of --select
    r.add_argument("--stats-only", action="store_true", help="keep statistics, not data")
    r.add_argument("--overwrite", action="store_true", help="replace an existing dump")
    r.add_argument("program", nargs=argparse.REMAINDER, help="-- python program.py [args]")

    d = sub.add_parser("demo", help="the real SmolLM2 model: fp32 vs bf16, a broken layer, "
                                    "llama.cpp")
    d.add_argument("--out", default="demo-out", help="where the demo's dumps go")
    d.add_argument("--skip", action="append", metavar="SECTION",
                   help="leave a section out: zoo, reference, llamacpp, bfloat16, broken, "
                        "generate")
    d.add_argument("--llamacpp-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the demo's llama.cpp engine (repeatable)")

    i = sub.add_parser("inspect", help="check a checkpoint's weights for NaN and Inf",
                       description="Reads a .safetensors file, a directory of shards, a PEFT "
                                   "adapter directory, a .gguf or a .bin/.pt. Exit code: 0 "
                                   "clean, 1 bad tensors (NaN or Inf), 2 error.")
    i.add_argument("path", help="checkpoint file or directory")
    add_report_files(i, "also write the full report as JSON")
    i.add_argument("--group", action="append", default=[], metavar="REGEX=COMPONENT",
                   help="put tensors whose name matches REGEX in COMPONENT (before the "
                        "default rules)")
    i.add_argument("--against", metavar="B",
                   help="compare with checkpoint B (any format): pair tensors by name, detect "
                        "layouts, measure errors; exit 1 if a tensor is missing, extra or "
                        "differs beyond what the dtypes explain")
    i.add_argument("--base", metavar="MODEL",
                   help="for a PEFT adapter: check its target_modules against the base "
                        "model's module names (any format); exit 1 for a target that matches "
                        "nothing or an adapted module the config does not name")
    add_weight_mapping(i)
    for module in _command_modules():
        module.register(sub)
    return p


#: subcommands that live in a module of their own (lockstep.cli.<name>): each has
#: ``register(sub)``, which adds its parser with ``set_defaults(handler=run)``
_COMMAND_MODULES = ("show", "split", "generate", "weights", "align", "zoo", "doctor",
                    "bench", "fuzz", "check", "imports")


def _command_modules() -> list[Any]:
    import importlib
    import importlib.util

    return [importlib.import_module(f"{__package__}.{name}") for name in _COMMAND_MODULES
            if importlib.util.find_spec(f"{__package__}.{name}") is not None]


def _report(result: Any, args: argparse.Namespace) -> int:
    from ..report.terminal import ComparisonReport

    output.show(ComparisonReport(result, rows=0 if args.all else args.rows), args)
    return _VERDICT_EXIT[result.verdict]


def _compare(args: argparse.Namespace) -> int:
    from ..compare import compare

    mapping, tolerances = _mapping(args)
    with output.progress() as progress:
        task = progress.add_task("comparing", total=None)
        result = compare(args.reference, args.candidate, tolerances, mapping=mapping,
                         progress=lambda done, total: progress.update(task, completed=done,
                                                                      total=total))
    return _report(result, args)


def _mapping(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``--mapping`` file (or None) and the ``--rtol``/``--tol`` tolerances (compare
    adds the file's own after them)."""
    from ..align.mapping import load_mapping
    from ..compare import Tolerances

    tolerances = Tolerances.parse(args.rtol, args.tol)
    if not args.mapping:
        return None, tolerances
    return load_mapping(args.mapping), tolerances


def _diff(args: argparse.Namespace) -> int:
    from ..workflows.diff import diff

    if args.decode < 0:
        raise UsageError("--decode must be 0 or more")
    if args.prompt is None and args.tokens is None and recording(args.reference) is None:
        raise UsageError("give the prompt: --prompt TEXT or --tokens 1,2,3")
    mapping, tolerances = _mapping(args)
    prompt, tokens = _prompts(args)
    if args.batch:
        return _batch_diff(args, prompt, tokens, mapping, tolerances)
    result = diff(args.reference, args.candidate, args.out, prompt=prompt,
                  tokens=tokens, decode=args.decode, free_running=args.free_running,
                  ref_options=_engine_options(args.reference, args.ref_dtype, args.ref_opt),
                  cand_options=_engine_options(args.candidate, args.cand_dtype,
                                               args.cand_opt),
                  tolerances=tolerances, mapping=mapping, replay=not args.no_replay,
                  announce=output.say, selection=selection(args))
    return _report(result, args)


def _batch_diff(args: argparse.Namespace, prompts: Any, tokens: Any, mapping: Any,
                tolerances: Any) -> int:
    from ..report.batch import BatchReport
    from ..workflows.batch import batch_diff

    if recording(args.reference) is not None or recording(args.candidate) is not None:
        raise UsageError("--batch runs both engines: give engine specs, not dump:DIR")
    result = batch_diff(args.reference, args.candidate, args.out, prompts=prompts,
                        tokens=tokens, decode=args.decode, padding=args.padding,
                        join_at=args.join_at, free_running=args.free_running,
                        ref_options=_engine_options(args.reference, args.ref_dtype,
                                                    args.ref_opt),
                        cand_options=_engine_options(args.candidate, args.cand_dtype,
                                                     args.cand_opt),
                        tolerances=tolerances, mapping=mapping, selection=selection(args),
                        announce=output.say)
    output.show(BatchReport(result, rows=0 if args.all else args.rows), args)
    return _VERDICT_EXIT[result.verdict]


def _replay(args: argparse.Namespace) -> int:
    from ..compare import compare
    from ..workflows.diff import replay_diff

    mapping, tolerances = _mapping(args)
    result = compare(args.reference, args.candidate, tolerances, mapping=mapping)
    result = replay_diff(args.engine, result,
                         _engine_options(args.engine, args.ref_dtype, args.ref_opt),
                         tolerances=tolerances, mapping=mapping, at=args.at,
                         cand_spec=args.cand_engine,
                         cand_options=_engine_options("", "", args.cand_opt),
                         announce=output.say)
    return _report(result, args)


def _capture(args: argparse.Namespace) -> int:
    from ..workflows.capture import capture

    if args.decode < 0:
        raise UsageError("--decode must be 0 or more")
    options = _engine_options(args.engine, args.dtype, args.opt)
    if takes(args.engine, "device"):
        options.setdefault("device", args.device)
    prompt, tokens = _prompts(args)
    if args.batch:
        if args.dry_run:
            raise UsageError("--dry-run sizes one prompt's capture; it does not take --batch")
        from ..workflows.batch import capture_batch

        capture_batch(args.engine, args.out, prompts=prompt, tokens=tokens, decode=args.decode,
                      padding=args.padding, join_at=args.join_at, overwrite=args.overwrite,
                      data=not args.stats_only, selection=selection(args),
                      announce=output.say, **options)
        return EXIT_OK
    if args.dry_run:
        from ..workflows.estimate import estimate

        output.write_lines(estimate(args.engine, prompt=prompt, tokens=tokens,
                                    decode=args.decode, data=not args.stats_only,
                                    announce=output.say, **selection(args), **options).lines())
        return EXIT_OK
    capture(args.engine, args.out, prompt=prompt, tokens=tokens, decode=args.decode,
            data=not args.stats_only, overwrite=args.overwrite,
            announce=output.say, **selection(args), **options)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from ..capture.program import run_program

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    return run_program(program, args.out, watch=args.watch, trace=args.trace,
                       data=not args.stats_only, overwrite=args.overwrite,
                       step_at=args.step_at, announce=output.say, **selection(args))


def _demo(args: argparse.Namespace) -> int:
    from ..demo import EXPECTED, run_demo

    console = output.stdout()
    verdicts = run_demo(args.out, show=console.print, skip=args.skip or (),
                        llamacpp_options=_engine_options("llamacpp:", "", args.llamacpp_opt))
    wrong = {k: v for k, v in verdicts.items() if v not in (EXPECTED[k], "skipped")}
    if wrong:
        console.print("[bold red]lockstep demo: these sections did not end as expected:[/] "
                      + ", ".join(f"{k} ({v}, expected {EXPECTED[k]})"
                                  for k, v in wrong.items()), highlight=False)
        return EXIT_ERROR
    return EXIT_OK


def _inspect_against(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..checkpoint.against import against_checkpoints
    from ..checkpoint.against_render import AgainstView

    with output.progress(TextColumn("comparing"), BarColumn(), MofNCompleteColumn()) as progress:
        task = progress.add_task("comparing", total=None)
        report = against_checkpoints(args.path, args.against, progress=lambda done, total:
                                     progress.update(task, completed=done, total=total),
                                     rename=weight_rename(args.mapping))
    output.show(AgainstView(report), args)
    return EXIT_OK if report else EXIT_DIVERGED


def _inspect(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

    if args.against:
        if args.base:
            raise UsageError("--base and --against are two different checks; give one")
        return _inspect_against(args)

    from ..checkpoint import inspect_checkpoint
    from ..checkpoint.render import InspectView

    targets = None
    if args.base:
        from ..checkpoint.targets import check_targets
        targets = check_targets(args.path, args.base)

    with output.progress(TextColumn("inspecting"), BarColumn(), DownloadColumn(),
                         TransferSpeedColumn(), TextColumn("{task.fields[tensors]}")) as progress:
        task = progress.add_task("inspecting", total=None, tensors="")
        report = inspect_checkpoint(
            args.path, groups=args.group,
            progress=lambda i, n, done, total: progress.update(
                task, completed=done, total=total, tensors=f"{i}/{n} tensors"))
    output.show(InspectView(report, targets), args)
    return EXIT_DIVERGED if report.bad or report.unreadable or (
        targets is not None and not targets) else EXIT_OK


_COMMANDS = {"compare": _compare, "diff": _diff, "replay": _replay, "demo": _demo,
             "capture": _capture, "run": _run,
             "inspect": _inspect}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code: 0 match/drift (or success), 1 diverged (or, for
    inspect/weights/generate, problems found), 2 a user error, 3 incomplete, 4 an internal
    error (a bug)."""
    args = None
    output.start()
    try:
        args = _parser().parse_args(argv)
        handler = getattr(args, "handler", None) or _COMMANDS[args.command]
        return handler(args)
    except LockstepError as exc:
        output.say(f"lockstep: error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        output.say("lockstep: interrupted")
        return 130
    except OSError as exc:
        if exc.filename is None:  # no file the user named: ours to explain
            return _internal(exc, args)
        output.say(f"lockstep: error: {exc.filename}: {exc.strerror or exc}")  # --json DIR/x, ...
        return EXIT_ERROR
    except Exception as exc:
        return _internal(exc, args)


def _internal(exc: Exception, args: Any) -> int:
    """A bug of ours: one line, the traceback behind --debug."""
    debug = getattr(args, "debug", False)
    if debug:
        import traceback

        traceback.print_exception(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    output.say(f"lockstep: internal error: {type(exc).__name__}: {first}; this is a bug in "
         "lockstep, please report it with the output of `lockstep doctor`"
         + ("" if debug else " (run again with `lockstep --debug ...` for the traceback)"))
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
