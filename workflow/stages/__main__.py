"""``python -m workflow.stages STAGE RECIPE``: run one stage in this environment (how the runner starts it)."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import load_recipe
from ..core.stage import StageContext, execute, report_failure
from . import stage_module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflow.stages", description="Run one stage in this environment.")
    parser.add_argument("stage")
    parser.add_argument("recipe")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--options", default="{}", help="stage options as JSON")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        ctx = StageContext(recipe=recipe, stage=args.stage, force=args.force, options=json.loads(args.options))
        execute(stage_module(args.stage), ctx)
        return 0
    except BaseException as err:  # noqa: BLE001 - the process boundary reports every failure
        if isinstance(err, SystemExit):
            raise
        return report_failure(err, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
