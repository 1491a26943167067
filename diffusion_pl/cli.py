"""`diffusion-pl`: LightningCLI for fit / validate / test, jsonargparse commands for sample / evaluate / sweep.

    diffusion-pl fit --config configs/quickstart.yaml
    diffusion-pl sample --ckpt path/to/last.ckpt --num_samples 64 --steps 250

A user error, told by its type (diffusion_pl.errors.UserError: a missing file, a bad option, a checkpoint that does not
fit, a full disk; a parse error, see diffusion_pl.parse_errors; Lightning's MisconfigurationException) is printed as
one line,
``diffusion-pl <command>: error: <message>``, with exit status 2. A process of a distributed run (rank 0 too) that
only lost its peers (another rank failed first and printed why) says so in one line, exit status 1.
DIFFUSION_PL_DEBUG=1 gives the traceback instead. Any other exception keeps its traceback.
"""

from __future__ import annotations

import importlib
import re
import sys
from functools import partial

from diffusion_pl.errors import (
    DEBUG_ENV,
    UserError,
    debug_requested,
    find_in_chain,
    find_lost_peer_error,
    in_distributed_run,
    launcher_rank,
)

__all__ = ["DEBUG_ENV", "debug_requested", "main", "run_command"]

# name -> "module:function"; each function's typed signature is its command line (diffusion_pl.commands.parser).
EXTRA_COMMANDS: dict[str, str] = {
    "sample": "diffusion_pl.commands.sample:sample",
    "evaluate": "diffusion_pl.commands.evaluate:evaluate",
    "sweep": "diffusion_pl.commands.sweep:sweep",
    "demo": "diffusion_pl.commands.demo:demo",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")

USAGE = """usage: diffusion-pl {fit,validate,test,%s} [options]

diffusion-pl: paper-exact ADM / Improved DDPM diffusion models on PyTorch Lightning.

  fit        train a DiffusionModule or NoisyClassifierModule (diffusion-pl fit --config configs/quickstart.yaml)
  validate   run validation of a checkpoint
  test       run the test loop of a checkpoint
%s
Run `diffusion-pl COMMAND --help` for the options of one command.
"""


def _usage() -> str:
    extra = "".join(f"  {name:<10} see `diffusion-pl {name} --help`\n" for name in EXTRA_COMMANDS)
    return USAGE % (",".join(EXTRA_COMMANDS) or "...", extra)


def run_lightning_cli(args: list[str]) -> None:
    """Run LightningCLI on `args` (first element is the subcommand)."""
    from diffusion_pl.lightning.cli import build_lightning_cli

    # LightningCLI warns when given args while sys.argv holds arguments too: pass None when they are the same.
    build_lightning_cli(None if args == sys.argv[1:] else args)


def run_command(command: str, args: list[str]) -> None:
    """Run one subcommand (``args`` start with it); exceptions propagate."""
    from diffusion_pl.utils.device import flush_denormals

    flush_denormals()  # CPU arithmetic on denormal floats is orders of magnitude slower (see utils/device.py)
    if command in EXTRA_COMMANDS:
        from jsonargparse import ArgumentError, ArgumentParser

        from diffusion_pl.commands.parser import build_parser, call_with_args
        from diffusion_pl.parse_errors import parse_error

        module_name, function_name = EXTRA_COMMANDS[command].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        prog, exit_on_error = f"diffusion-pl {command}", debug_requested()  # debug: jsonargparse's own report
        parser = build_parser(function, prog, partial(ArgumentParser, exit_on_error=exit_on_error))
        try:  # parse errors raise ArgumentError: one line in main
            call_with_args(function, args[1:], parser)
        except ArgumentError as error:
            options = [f"--{key}" for key in parser.get_defaults().keys()]
            raise parse_error(error, prog, options, key_prefix="--") from error
    else:
        run_lightning_cli(args)


def find_user_mistake(error: BaseException | None) -> BaseException | None:
    """The user's mistake in ``error``'s causes, by type: a UserError, a parse error (argparse's ArgumentError, e.g.
    checkpoint hyperparameters that do not parse) or a setting Lightning refuses (MisconfigurationException, e.g.
    ``--accelerator gpu`` without a GPU)."""
    from argparse import ArgumentError

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return find_in_chain(error, lambda e: isinstance(e, (UserError, ArgumentError, MisconfigurationException)))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command = args[0]
    if command not in EXTRA_COMMANDS and command not in LIGHTNING_COMMANDS:
        print(f"diffusion-pl: unknown command {command!r}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    try:
        run_command(command, args)
    except Exception as error:
        user_error = find_user_mistake(error)
        if debug_requested():
            raise
        if user_error is None:
            rank = launcher_rank()
            lost = find_lost_peer_error(error) if rank > 0 or in_distributed_run() else None
            if lost is None:
                raise
            # Another rank failed first (its own message is printed by that rank); this one only lost its peers.
            text = str(lost).strip()
            first_line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]) if text else type(lost).__name__
            print(f"diffusion-pl {command}: error: [rank {rank}] stopped because another process of this "
                  f"run stopped first (see its message above; DIFFUSION_PL_DEBUG=1 shows this traceback): "
                  f"{first_line if len(first_line) <= 160 else first_line[:160] + '…'}", file=sys.stderr)  # fmt: skip
            return 1
        print(f"diffusion-pl {command}: error: {user_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
