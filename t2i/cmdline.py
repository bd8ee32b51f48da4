"""Argparse conventions shared by every `t2i` sub-command (tools/ and pipelines/ parse their own flags).

Why one place: a user reads `t2i make-shards --help`, so each parser's `usage:` line must name the
command they typed (`t2i make-shards`, not `python -m tools.make_shards`), and every flag with a
default must show it, so nobody has to read the source to learn what a flag does when left out.
"""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (the module docstrings are the examples) and appends
    "(default: X)" to a flag's help when it has a real default. None and False defaults are left out
    (the help says what happens then), as is a help text that already speaks of its default."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default, text = action.default, action.help or ""
        return not (default is None or default is False or default is argparse.SUPPRESS or text is argparse.SUPPRESS
                    or "default" in text.lower() or not action.option_strings)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # a flag without help still shows its default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if not self._shows_default(action):
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def parser(command: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose usage line reads `t2i <command>` and whose help shows the defaults."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return argparse.ArgumentParser(prog=f"t2i {command}", description=description, **kwargs)
