"""Command lines that mix flags and `key.path=value` config overrides in any order.

    t2i train --nproc 2 run.name=r --stop-at 20 train.steps=40

argparse matches a positional `nargs="*"` list only where it first meets positionals, so overrides
after a flag used to end in "unrecognized arguments". Every command that takes overrides parses
with `parse_with_overrides`, so they may go anywhere and all commands behave alike: argparse
parses the flags (parse_known_args), every leftover token that reads `key=value` is an override,
and anything else left over (an unknown `--flag`, a stray word) is still an error naming it.
Overrides keep their command-line order, so a key given twice takes its last value.
"""

from __future__ import annotations

import argparse
from collections import Counter

OVERRIDES_HELP = "key.path=value config overrides (YAML values), anywhere on the line"


def is_override(token: str) -> bool:
    """`section.key=value` (not a flag, a non-empty key before the first `=`)."""
    return not token.startswith("-") and "=" in token and bool(token.split("=", 1)[0].strip())


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """The positional that documents overrides in --help (parse_with_overrides collects them all)."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str], *,
                         subparsers: argparse._SubParsersAction | None = None,
                         optional_values: tuple[str, ...] = ()) -> argparse.Namespace:
    """Parse `argv`; `args.overrides` = every `key=value` token in command-line order.

    `subparsers`: the parser's sub-commands, so that an error is reported by the sub-command's
    parser (`t2i train: error: ...`). `optional_values`: destinations of `nargs="?"` flags (such as
    `--resume [TAG]`) that may have swallowed a following override; such a value is taken back as an
    override and the flag gets its `const`.
    """
    args, extras = parser.parse_known_args(argv)
    target = subparsers.choices[args.command] if subparsers is not None else parser
    stray = [t for t in extras if not is_override(t)]
    if stray:
        target.error(f"unrecognized arguments: {' '.join(stray)} (config overrides read key.path=value "
                     f"and may go anywhere on the line)")
    found = list(getattr(args, "overrides", None) or []) + list(extras)
    not_overrides = [t for t in found if not is_override(t)]
    if not_overrides:
        target.error(f"argument {not_overrides[0]!r} is not a config override (key.path=value)")
    for dest in optional_values:
        value = getattr(args, dest, None)
        if isinstance(value, str) and is_override(value):
            found.append(value)
            setattr(args, dest, _const(target, dest))
    args.overrides = _in_argv_order(found, argv)
    return args


def _const(parser: argparse.ArgumentParser, dest: str):
    """The value a `nargs="?"` flag takes when given without a value."""
    for action in parser._actions:  # argparse keeps no public index of its actions
        if action.dest == dest:
            return action.const
    raise KeyError(dest)


def _in_argv_order(tokens: list[str], argv: list[str]) -> list[str]:
    pool = Counter(tokens)
    ordered = []
    for token in argv:
        if pool[token] > 0:
            ordered.append(token)
            pool[token] -= 1
    return ordered


def resolution_arg(text: str):
    """--resolution of `t2i sample` / `t2i eval`: "N" -> N (a square, as always; so is "NxN"), "WxH" -> (W, H)
    (t2i.buckets.parse_size: width x height in pixels); a malformed value is an argparse error."""
    from t2i.buckets import parse_size
    from t2i.errors import ConfigError

    try:
        w, h = parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--resolution: ")) from None
    return w if w == h else (w, h)
