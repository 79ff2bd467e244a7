"""The ``nos-sym`` command line.

Every failure the user can cause (a bad rule, a missing dataset, a bad run directory) prints one
line ``nos-sym: error: ...`` on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Callable, Sequence

from nos_sym.dsl import Rule, parse
from nos_sym.errors import CommandError, InputWarning, UserError  # layers raise them too

EXIT_USAGE = 2


def rule_summary(rule: Rule) -> dict[str, object]:
    """The JSON view of a rule: ``{"dsl", "minimal_dsl", "key", "latex", "sympy",
    "degenerate"}`` (``minimal_dsl``: only the live groups, see ``Rule.minimal_dsl``)."""
    return {
        "dsl": rule.dsl,
        "minimal_dsl": rule.minimal_dsl,
        "key": rule.key,
        "latex": rule.latex(),
        "sympy": str(rule.sympy),
        "degenerate": rule.is_degenerate,
    }


def _parse_command(args: argparse.Namespace) -> None:
    rule = parse(args.rule)
    if args.format == "json":
        print(json.dumps(rule_summary(rule)))
    elif args.format == "latex":
        print(rule.latex())
    elif args.format == "dsl":
        print(rule.dsl)
    else:
        summary = rule_summary(rule)
        width = max(map(len, summary))
        for name, value in summary.items():
            print(f"{name:>{width}}: {value}")


def _tree_command(args: argparse.Namespace) -> None:
    from nos_sym.render import draw_tree

    try:
        path = draw_tree(parse(args.rule), args.output, view=args.view)
    except OSError as error:
        raise CommandError(f"cannot write {args.output}: {error.strerror or error}") from None
    except ValueError as error:  # an unsupported file extension
        raise CommandError(str(error)) from None
    print(path)


def _data_command(args: argparse.Namespace) -> None:
    from nos_sym.evaluation import datasets

    try:
        if args.action == "fetch":
            print(datasets.download(args.name))
            return
        data = datasets.load(args.name)
    except datasets.DatasetError as error:
        raise CommandError(str(error).replace("\n", " ")) from None
    print(
        f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test images of shape "
        f"{data.shape}, {len(data.classes)} classes, from {data.source}"
    )


def _add_data(command: argparse.ArgumentParser) -> None:
    from nos_sym.evaluation.datasets import DATASETS

    command.add_argument("action", choices=("fetch", "info"))
    command.add_argument("name", choices=DATASETS)
    command.set_defaults(run=_data_command)


def _add_parse(command: argparse.ArgumentParser) -> None:
    command.add_argument("rule", help="a DSL rule, quoted as one argument")
    command.add_argument("--format", choices=("text", "latex", "json", "dsl"), default="text")
    command.set_defaults(run=_parse_command)


def _add_tree(command: argparse.ArgumentParser) -> None:
    command.add_argument("rule", help="a DSL rule, quoted as one argument")
    command.add_argument("-o", "--output", required=True, help="FILE.png or FILE.dot")
    command.add_argument("--view", choices=("expr", "dsl"), default="expr")
    command.set_defaults(run=_tree_command)


COMMANDS: dict[str, tuple[str, str]] = {
    "parse": ("nos_sym.cli:_add_parse", "parse a rule: canonical form, key, LaTeX"),
    "tree": ("nos_sym.cli:_add_tree", "draw a rule's tree as PNG or DOT"),
    "data": ("nos_sym.cli:_add_data", "download (fetch) or describe (info) a dataset"),
    "evaluate": ("nos_sym.evaluation.commands:add_evaluate", "train the child network with a rule"),
    "calibrate": (
        "nos_sym.evaluation.commands:add_calibrate",
        "how well cheap protocols rank rules against an expensive one: table, JSON, scatter plots",
    ),
    "search": ("nos_sym.controller.commands:add_search", "run (or resume) a dedup-aware search"),
    "top": ("nos_sym.controller.read_commands:add_top", "a run's leaderboard"),
    "status": ("nos_sym.controller.read_commands:add_status", "a run's counts"),
    "report": ("nos_sym.controller.commands:add_report", "reward curves and best trees of a run"),
    "study": (
        "nos_sym.controller.commands:add_study",
        "does the search beat random? arms at equal compute, curves, final table, rank test",
    ),
    "rosenbrock": (
        "nos_sym.tasks.commands:add_rosenbrock",
        "run rules on the 2-D Rosenbrock function (paper Figure 6): table, JSON, figures",
    ),
    "transfer": (
        "nos_sym.tasks.commands:add_transfer",
        "baselines and rules on a bigger task (paper Table 1): Markdown, LaTeX, JSON, curves",
    ),
}
"""Sub-command → (``module:function`` that defines its arguments, given its parser; help). A
command's module is imported only when that command runs, so ``nos-sym parse`` starts without
torch or the evaluator. A new command is one row here and its function in its layer's
``commands.py``."""


def _define(target: str) -> Callable[[argparse.ArgumentParser], None]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``nos-sym`` parser. Every sub-command is listed; with ``command`` given only its
    arguments are defined (the others' modules are not imported), with None all of them."""
    parser = argparse.ArgumentParser(
        prog="nos-sym", description="Neural Optimizer Search with a symbolic update-rule DSL."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (target, text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=text, description=text)
        if command is None or command == name:
            _define(target)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else "").parse_args(argv)
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_one_line(message, category, *where, **options) -> None:
            """An :class:`InputWarning` (e.g. a torn sample log) as one line on stderr."""
            if issubclass(category, InputWarning):
                print(f"nos-sym: warning: {message}", file=sys.stderr)
            else:
                show(message, category, *where, **options)

        warnings.showwarning = show_one_line
        try:
            args.run(args)
        except UserError as error:
            message = " ".join(str(error).split())
            print(f"nos-sym: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("nos-sym: interrupted", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
