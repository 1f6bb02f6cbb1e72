"""The ``ase-bptt`` group: one place that turns user errors into one ``Error:`` line, and the command list."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

__all__ = ["cli", "command", "user_errors"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes shown as one line instead of a traceback.

    Every error ase-bptt raises on purpose derives from
    :class:`~ase_bptt.errors.AseBpttError`; the rest are the OS's file errors
    and ASE's "unknown file type".
    """
    from ase.io.formats import UnknownFileTypeError

    from ase_bptt.errors import AseBpttError

    return (
        AseBpttError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        UnknownFileTypeError,
    )


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text or type(exc).__name__


class _Group(click.Group):
    """The ``ase-bptt`` group: one-line user errors, commands listed with an example each."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except user_errors() as exc:
            raise click.ClickException(one_line(exc)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        # Workflow order (data -> training -> use -> demo), not alphabetical.
        return list(self.commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands = [(n, c) for n in self.list_commands(ctx) if (c := self.get_command(ctx, n)) and not c.hidden]
        if not commands:
            return
        first = max(len(n) for n, _ in commands) + 3
        with formatter.section("Commands"):
            indent = " " * (formatter.current_indent + first)
            text_width = max((formatter.width or 80) - len(indent), 30)
            for name, cmd in commands:
                summary = click.formatting.wrap_text(cmd.get_short_help_str(limit=200), text_width)
                lines = summary.splitlines() or [""]
                formatter.write(" " * formatter.current_indent + name.ljust(first) + lines[0] + "\n")
                for line in lines[1:]:
                    formatter.write(indent + line + "\n")
                example = getattr(cmd, "example", None)
                if example:
                    # Examples are never wrapped, so they can be copied as they are.
                    formatter.write(f"{indent}e.g. {example}\n")


def command(group: click.Group, name: str, *, example: str, **kwargs: Any) -> Callable:
    """``group.command`` that also records a one-line example and shows it in the epilog."""

    def deco(f: Callable) -> click.Command:
        epilog = "\b\nExample:\n  " + example
        cmd = group.command(name, epilog=epilog, **kwargs)(f)
        cmd.example = example  # type: ignore[attr-defined]
        return cmd

    return deco


class _LogLines(logging.Handler):
    """``ase_bptt`` log records as lines on stderr ("Warning: " before warnings).

    Written through ``tqdm.write``, which lifts an open progress bar, prints
    the line and redraws the bar below it, so a line never splits a bar and
    no bar is printed twice. The stream is looked up per line (click's test
    runner swaps it).
    """

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        prefix = "Warning: " if record.levelno >= logging.WARNING else ""
        try:
            tqdm.write(prefix + self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler must not raise into the caller
            self.handleError(record)


def log_to_stderr(quiet: bool) -> None:
    """Send the ``ase_bptt`` loggers' INFO lines (warnings only with ``quiet``) to stderr, once per process."""
    logger = logging.getLogger("ase_bptt")
    for old in [h for h in logger.handlers if isinstance(h, _LogLines)]:
        logger.removeHandler(old)
    handler = _LogLines(logging.WARNING if quiet else logging.INFO)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


# -------------------------------------------------------------------- group
@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="ase-bptt", prog_name="ase-bptt")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no INFO lines (warnings and errors only).")
def cli(quiet: bool) -> None:
    """Fine-tune machine-learned interatomic potentials by backpropagation through
    whole relaxations (BPTT), and use them from ASE.

    \b
    Practitioner workflow:
      ase-bptt import vasp_runs/ --db traj.db      # your DFT relaxations
      ase-bptt finetune traj.db -o si.pt           # pretrains first if no --init
      ase-bptt relax POSCAR --model si.pt -o CONTCAR
    or in Python: atoms.calc = BPTTCalculator("si.pt")
    """
    log_to_stderr(quiet)
