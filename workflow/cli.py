"""``workflow`` — the command line.

    workflow run RECIPE [--stages a,b] [--from STAGE] [--force] [--detach] [--replace]
    workflow validate RECIPE...
    workflow ingest|model|train|evaluate|serve RECIPE [--force]
    workflow batch RECIPE --input URI --output URI [--adapter PATH ...] [--max-errors N]
    workflow serve RECIPE [--detach | --stop] [--replace] [--adapters a,b]      workflow stop RECIPE
    workflow sync SRC DEST
    workflow tiny-model --data FILE... --out DIR
    workflow show RECIPE|RUN_URI [--html [PATH]]

Errors print one line (``--debug`` adds the traceback) and exit non-zero. A stage shows its own
progress lines and writes everything the libraries print to ``<run>/logs/<stage>.log``;
``--verbose`` (or ``WORKFLOW_VERBOSE=1``) shows everything on the console too.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from . import runner
from .config import load_recipe
from .core.errors import WorkflowError
from .core.stage import report_failure
from .preflight import check_recipe
from .stages import JOBS, STAGES
from .training.llamafactory_args import check_recipe_in_train_env


def _cmd_validate(args) -> int:
    # The library sections are checked here, in the serve env, against the libraries themselves.
    import logging

    from .config.evaluate import check_library_fields
    from .serving.app import check_recipe_llm_config

    logging.getLogger("vllm").setLevel(logging.ERROR)  # only its argument types are used: no import-time warnings
    failed = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
            stages = runner.select_stages(recipe)
            check_recipe_in_train_env(recipe)  # LLaMA-Factory keys, against LLaMA-Factory itself
            if recipe.evaluate is not None:  # vLLMEngineProcessorConfig, vLLM engine args, SamplingParams
                check_library_fields(recipe.evaluate, where=f"{recipe.path}: evaluate")
            if recipe.serve is not None:  # LLMConfig as the serve stage builds it, vLLM engine args
                check_recipe_llm_config(recipe)
            check_recipe(recipe, on_cluster=bool(os.environ.get("RAY_ADDRESS")))  # what fails later, knowable now
            print(f"ok  {path}  ({recipe.name}: {' -> '.join(stages)}; storage {recipe.run_uri})")
        except WorkflowError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr)
    return 2 if failed else 0


def _cmd_run(args) -> int:
    recipe = load_recipe(args.recipe)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    serve = {k: True for k in ("detach", "replace") if getattr(args, k)}
    options = {"serve": serve} if serve else None
    runner.run_pipeline(recipe, stages=stages, from_stage=args.from_stage, force=args.force, debug=args.debug,
                        options=options)
    from .report_html import write_report
    from .show import run_summary

    try:
        write_report(recipe.run_uri)
    except WorkflowError as err:
        print(f"warning: no {recipe.run_uri}/report.html: {err}", file=sys.stderr, flush=True)
    print(run_summary(recipe), flush=True)
    return 0


def _cmd_stage(args) -> int:
    recipe = load_recipe(args.recipe)
    options = {k: v for k, v in vars(args).items() if k in ("detach", "stop", "replace") and v}
    if getattr(args, "adapters", None):
        options["adapters"] = [a.strip() for a in args.adapters.split(",") if a.strip()]
    if args.command == "stop":
        args.command, options = "serve", {"stop": True}
    runner.run_stage(args.command, recipe, force=getattr(args, "force", False), debug=args.debug, options=options)
    return 0


def _cmd_batch(args) -> int:
    recipe = load_recipe(args.recipe)
    options = {"input": args.input, "output": args.output, "adapters": args.adapter or [],
               "max_errors": args.max_errors}
    runner.run_stage("batch", recipe, debug=args.debug, options=options, job=True)
    return 0


def _cmd_sync(args) -> int:
    from .core.sync import sync

    sync(args.src, args.dest)
    return 0


def _cmd_tiny_model(args) -> int:
    from .config import TinyModelConfig
    from .training.tiny_model import build_tiny_model

    out = build_tiny_model(args.data, args.out, TinyModelConfig())
    print(f"tiny model written to {out}")
    return 0


def _cmd_show(args) -> int:
    from .show import run_uri_of, show

    if args.html is None:
        show(args.target)
        return 0
    from .report_html import write_report

    print(f"report: {write_report(run_uri_of(args.target), args.html or None)}")
    return 0


REPLACE_HELP = ("without --detach: smoke-check even while the recipe's detached app runs on the workflow's own "
                "cluster, replacing it (on a cluster named by RAY_ADDRESS the check is an app of its own)")
VERBOSE_HELP = (f"show everything the stages print (sets {runner.VERBOSE_ENV}=1; by default the libraries' "
                "output goes only to <run>/logs/<stage>.log)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks (and everything, as --verbose)")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    # --debug and --verbose are accepted after the command too; SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks (and everything, as --verbose)")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    # --address: the Ray cluster the stages join (RAY_ADDRESS; see workflow/core/ray_cluster.py).
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--address", help="join this Ray cluster (sets RAY_ADDRESS; default: a private "
                         "local cluster per stage)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])
    add_on_cluster = functools.partial(sub.add_parser, parents=[common, cluster])

    p = add_on_cluster("run", help="run the recipe's stages in order")
    p.add_argument("recipe")
    p.add_argument("--stages", help="comma-separated subset, e.g. ingest,train")
    p.add_argument("--from", dest="from_stage", help="start at this stage")
    p.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    p.add_argument("--detach", action="store_true", help="leave the served app running at the end")
    p.add_argument("--replace", action="store_true", help=REPLACE_HELP)
    p.set_defaults(func=_cmd_run)

    p = add("validate", help="check recipes without running anything")
    p.add_argument("recipes", nargs="+")
    p.set_defaults(func=_cmd_validate)

    for name, spec in STAGES.items():
        p = add_on_cluster(name, help=spec.doc)
        p.add_argument("recipe")
        p.add_argument("--force", action="store_true")
        if name == "serve":
            group = p.add_mutually_exclusive_group()
            group.add_argument("--detach", action="store_true", help="leave the app running")
            group.add_argument("--stop", action="store_true", help="shut the app down")
            p.add_argument("--replace", action="store_true", help=REPLACE_HELP)
            p.add_argument("--adapters", metavar="A,B", help="serve only these of the run's adapters (each must "
                           "still pass serve.require)")
        p.set_defaults(func=_cmd_stage)

    p = add_on_cluster("stop", help="shut down the recipe's served app (on the cluster its endpoint.json names)")
    p.add_argument("recipe")
    p.set_defaults(func=_cmd_stage)

    p = add_on_cluster("batch", help=JOBS["batch"].doc)
    p.add_argument("recipe")
    p.add_argument("--input", required=True, help="JSONL, Parquet or CSV (local, s3://, gs://)")
    p.add_argument("--output", required=True, help="where to write (.parquet or .jsonl)")
    p.add_argument("--adapter", action="append", help="a LoRA adapter folder; repeat for several")
    p.add_argument("--max-errors", type=int, default=0, metavar="N",
                   help="rows that may fail (error column set) before the job exits non-zero (default 0)")
    p.set_defaults(func=_cmd_batch)

    p = add("sync", help="copy a folder between local disk and object storage")
    p.add_argument("src")
    p.add_argument("dest")
    p.set_defaults(func=_cmd_sync)

    p = add("tiny-model", help="build a tiny Qwen2-architecture model with a tokenizer trained on data")
    p.add_argument("--data", nargs="+", required=True, help="JSONL/CSV files whose text trains the tokenizer")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_tiny_model)

    p = add("show", help="show a run's stages, outputs and lineage")
    p.add_argument("target", help="a recipe file or a run's storage URI")
    p.add_argument("--html", nargs="?", const="", metavar="PATH",
                   help="write the run's report page instead (default PATH: <run>/report.html; a local path or URI)")
    p.set_defaults(func=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address  # the stage processes inherit it
    if args.verbose:
        os.environ[runner.VERBOSE_ENV] = "1"
    try:
        return args.func(args)
    except runner.StageFailed as err:
        # The stage process has already printed its one-line error.
        if args.command == "run":
            print(f"[run] stopped: {err}", flush=True)
        return err.code
    except BaseException as err:  # noqa: BLE001 - the CLI reports every failure in one line
        if isinstance(err, SystemExit):
            raise
        return report_failure(err, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
