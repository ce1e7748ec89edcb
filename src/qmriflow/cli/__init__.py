"""Command-line interface: ``qmriflow <step> ...`` (one entry point).

The steps live in one module per stage group, in the order the data flows: :mod:`.phantom`,
:mod:`.archive`, :mod:`.preproc`, :mod:`.model`, :mod:`.cse`, :mod:`.stats`, :mod:`.workflow`; this
module holds the registry (``@command``), the shared argument helpers and :func:`main`.

Every Snakemake rule calls exactly one of these subcommands. Failures that the user can act on
end with a one-line message on stderr (``qmriflow <step>: error: session ...: file: reason``)
and exit status 1; nothing partial is left where a complete output is expected.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__
from ..errors import QmriflowError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str):
    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = (help_text, getattr(fn, "_configure", lambda p: None), fn)
        return fn

    return deco


def arguments(configure: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Handler) -> Handler:
        fn._configure = configure  # type: ignore[attr-defined]
        return fn

    return deco


def positive_int(text: str) -> int:
    """argparse type of every thread, core and worker count: an integer >= 1.

    ``--threads -2`` or ``--cores 0`` is refused with a usage error (exit status 2) instead of
    reaching a tool, or a provenance record, as a nonsensical count."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def count_or_auto(text: str) -> int:
    """argparse type of a thread count where 0 has the documented meaning "all available":
    an integer >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (0 = all available), got {n}")
    return n


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", required=True, help="subject pseudonym (without sub-)")
    p.add_argument("--session", required=True, help="session pseudonym (without ses-)")
    p.add_argument("--failures", type=Path, help="folder for this run's failure records")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


def _with_session(label: str, fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except QmriflowError as exc:
        raise exc.with_context(session=label) from None


def _provenance(a: argparse.Namespace, step: str, info: dict) -> None:
    if getattr(a, "provenance", None):
        from ..workflow.provenance import write_step

        write_step(a.provenance, step, info)




# ---------------------------------------------------------------------------------------------


#: modules that add more steps with the same ``@command`` decorator (imported lazily so that
#: ``qmriflow --help`` stays fast and the science modules are not imported at start-up)
_COMMAND_MODULES = ("qmriflow.cli.cse", "qmriflow.cli.model", "qmriflow.cli.stats")


def _load_command_modules() -> None:
    import importlib
    import importlib.util

    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(
        prog="qmriflow",
        description="Quantitative T1/T2/PD and fat/water maps from routine clinical MRI.",
    )
    parser.add_argument("--version", action="version", version=f"qmriflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<step>", title="steps")
    for name, (help_text, configure, _fn) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        configure(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _help, _conf, fn = _COMMANDS[args.command]
    failures = getattr(args, "failures", None)
    label = (f"sub-{args.subject}_ses-{args.session}"
             if getattr(args, "subject", None) and getattr(args, "session", None) else None)
    try:
        rc = fn(args)
    except QmriflowError as exc:
        if failures is not None and label:
            from ..workflow.failures import record_failure

            record_failure(failures, label, args.command, str(exc))
        print(f"qmriflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # a bug or an unforeseen tool failure: keep the traceback in the log, and still list
        # the session in this run's failures table
        if failures is not None and label:
            from ..workflow.failures import record_failure

            first = (str(exc).splitlines() or [""])[0][:300]
            record_failure(failures, label, args.command,
                           f"unexpected error in {args.command}: {type(exc).__name__}: {first}")
        raise
    if failures is not None and label:
        from ..workflow.failures import clear_failure

        clear_failure(failures, label, args.command)
    return rc


# The steps that import only the standard library at start-up are registered on import, in
# the order the data flows (``qmriflow --help`` lists them so); the science-heavy groups above
# are imported lazily by build_parser.
from . import phantom, archive, preproc, workflow  # noqa: E402, F401, I001
