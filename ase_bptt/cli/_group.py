"""The ``ase-bptt`` group: one place that turns user errors into one ``Error:`` line, and the command list."""

from __future__ import annotations

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


class _Command(click.Command):
    """A command whose config-derived options are built when first needed (``command(params=...)``):
    they read the training configs, which load torch, and ``ase-bptt --help`` should not."""

    def __init__(self, *args: Any, lazy_params: Callable[[], list[click.Parameter]] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self._lazy_params = lazy_params

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._lazy_params is not None:
            self.params.extend(self._lazy_params())
            self._lazy_params = None
        return super().get_params(ctx)


def command(
    group: click.Group,
    name: str,
    *,
    example: str,
    params: Callable[[], list[click.Parameter]] | None = None,
    **kwargs: Any,
) -> Callable:
    """``group.command`` that also records a one-line example and shows it in the epilog; ``params``
    gives more options, built the first time the command parses or shows its help."""

    def deco(f: Callable) -> click.Command:
        epilog = "\b\nExample:\n  " + example
        cmd = group.command(name, cls=_Command, epilog=epilog, lazy_params=params, **kwargs)(f)
        cmd.example = example  # type: ignore[attr-defined]
        return cmd

    return deco


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
    from ase_bptt.logs import log_to_stderr

    log_to_stderr(quiet)
