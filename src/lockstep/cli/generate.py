"""``lockstep generate``: greedy decoding on a reference and a candidate engine, compared token
by token (a thin shell over ``lockstep.generation.check_generation``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..engines.registry import kinds_epilog, spec_help
from ..errors import UsageError
from . import output
from .options import add_report_files, add_side_options, int_list, side_options

__all__ = ["register", "run"]

EXIT_OK, EXIT_FAILED = 0, 1


def register(sub: Any) -> None:
    """Add the ``generate`` subcommand."""
    from ..generation.metrics import MAX_KL, NEAR_TIE

    g = sub.add_parser(
        "generate", help="greedy-decode on both engines: token splits, near-ties, KL, garbage",
        description="Greedy decoding on both engines, free-running and teacher-forced (the "
                    "candidate fed the reference's tokens); at a real split (not a near-tie) "
                    "or a KL over the limit the tensors are recorded and compared there. Exit "
                    "code: 0 no real split, no KL over the limit and no garbage, 1 otherwise, "
                    "2 error.",
        epilog=kinds_epilog())
    g.add_argument("reference", help=spec_help())
    g.add_argument("candidate", help="engine spec, as for the reference")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE", help="one prompt per line (.txt), or JSONL "
                     "with {\"prompt\": ...} or {\"messages\": [...]} per line (.jsonl)")
    src.add_argument("--prompt", metavar="TEXT", help="one prompt (tokenized by the reference)")
    src.add_argument("--tokens", type=int_list, metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="greedy tokens per prompt (default 16)")
    g.add_argument("--chat", action="store_true",
                   help="apply the reference tokenizer's chat template to text prompts")
    add_side_options(g)
    g.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="top-k for overlap and closeness (default 5)")
    g.add_argument("--near-tie", type=float, default=NEAR_TIE, metavar="X",
                   help="a split where each side prefers its own token by at most X nats "
                        f"(log-probability = logit units) is a near-tie (default {NEAR_TIE})")
    g.add_argument("--max-kl", type=float, default=MAX_KL, metavar="X",
                   help="a prompt whose mean KL(reference || candidate) is above X nats "
                        f"diverges, even where the top tokens agree (default {MAX_KL})")
    g.add_argument("--batch", action="store_true",
                   help="run the candidate on all the prompts as one batch (the reference "
                        "runs each alone)")
    g.add_argument("--padding", choices=("left", "right"), default="left",
                   help="with --batch: where the shorter prompts are padded (default left)")
    g.add_argument("--join-at", type=int, metavar="STEP",
                   help="with --batch: the last prompt joins at this step while the others "
                        "decode (continuous batching)")
    g.add_argument("--no-localize", action="store_true",
                   help="do not record and compare tensors where a prompt diverges")
    g.add_argument("--out", default="lockstep-generate", metavar="DIR",
                   help="where the dumps of diverging prompts go (default lockstep-generate/)")
    add_report_files(g, "also write the JSON report")
    g.add_argument("--mapping", metavar="FILE",
                   help="mapping file (docs/mapping.md) for the tensors compared where a "
                        "prompt diverges")
    g.add_argument("--rows", type=int, default=12, metavar="N",
                   help="rows of each detail table and of the tensor comparison (default 12)")
    g.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the check, print the report; 0 pass, 1 a real split, a KL over the limit or
    garbage."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..generation import Prompt, check_generation, load_prompts
    from ..generation.render import GenerationReport

    mapping = None
    if args.mapping:  # a bad file is said before any engine loads
        from ..align.mapping import load_mapping

        mapping = load_mapping(args.mapping)
    if args.join_at is not None and not args.batch:
        raise UsageError("--join-at needs --batch")
    if args.tokens is not None:
        if args.chat:
            raise UsageError("--chat applies a chat template to text; it cannot go with --tokens")
        if not args.tokens:
            raise UsageError("--tokens needs at least one token id, e.g. --tokens 1,2,3")
        prompts = [Prompt(tokens=tuple(args.tokens))]
    elif args.prompt is not None:
        prompts = [Prompt(text=args.prompt, chat=args.chat)]
    else:
        prompts = load_prompts(args.prompts, chat=args.chat)
    ref_options, cand_options = side_options(args)
    err = output.stderr()
    announce = (lambda m: err.print(m, highlight=False)) if err.is_terminal else output.say
    with output.progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("prompts")) as progress:
        task = progress.add_task("decoding", total=len(prompts))
        result = check_generation(
            args.reference, args.candidate, prompts, max_new_tokens=args.max_new_tokens,
            top_k=args.top_k, near_tie=args.near_tie, max_kl=args.max_kl,
            localize=not args.no_localize,
            out=args.out,
            ref_options=ref_options, cand_options=cand_options,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            announce=announce, mapping=mapping,
            batch={"padding": args.padding, "join_at": args.join_at} if args.batch else None)
    output.show(GenerationReport(result, rows=args.rows), args)
    return EXIT_OK if result else EXIT_FAILED
