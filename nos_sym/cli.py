"""The ``nos-sym`` command line.

Every failure the user can cause (a bad rule, a missing dataset, a bad run directory) prints one
line ``nos-sym: error: ...`` on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from nos_sym.dsl import DSLSyntaxError, Rule, parse

EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def rule_summary(rule: Rule) -> dict[str, object]:
    """The JSON view of a rule: ``{"dsl", "key", "latex", "sympy", "degenerate"}``."""
    return {
        "dsl": rule.dsl,
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
        for name, value in rule_summary(rule).items():
            print(f"{name:>10}: {value}")


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


def _add_data(subparsers) -> None:
    from nos_sym.evaluation.datasets import DATASETS

    command = subparsers.add_parser("data", help="download (fetch) or describe (info) a dataset")
    command.add_argument("action", choices=("fetch", "info"))
    command.add_argument("name", choices=DATASETS)
    command.set_defaults(run=_data_command)


def _add_parse(subparsers) -> None:
    command = subparsers.add_parser("parse", help="parse a rule: canonical form, key, LaTeX")
    command.add_argument("rule", help="a DSL rule, quoted as one argument")
    command.add_argument("--format", choices=("text", "latex", "json", "dsl"), default="text")
    command.set_defaults(run=_parse_command)


def _add_tree(subparsers) -> None:
    command = subparsers.add_parser("tree", help="draw a rule's tree as PNG or DOT")
    command.add_argument("rule", help="a DSL rule, quoted as one argument")
    command.add_argument("-o", "--output", required=True, help="FILE.png or FILE.dot")
    command.add_argument("--view", choices=("expr", "dsl"), default="expr")
    command.set_defaults(run=_tree_command)


def _add_layers(subparsers) -> None:
    from nos_sym.controller.commands import add_search_commands
    from nos_sym.evaluation.commands import add_evaluate
    from nos_sym.tasks.commands import add_rosenbrock

    add_evaluate(subparsers)
    add_search_commands(subparsers)
    add_rosenbrock(subparsers)


COMMANDS: list[Callable] = [_add_parse, _add_tree, _add_data, _add_layers]
"""Each adds sub-commands to the parser."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input (printed as one line), not bugs."""
    from nos_sym.controller.search import SearchError
    from nos_sym.evaluation.datasets import DatasetError
    from nos_sym.evaluation.store import StoreError

    return DSLSyntaxError, CommandError, SearchError, DatasetError, StoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nos-sym", description="Neural Optimizer Search with a symbolic update-rule DSL."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except _user_errors() as error:
        message = " ".join(str(error).split())
        print(f"nos-sym: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nos-sym: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
