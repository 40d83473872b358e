"""The ``densenet`` command line: a thin layer over the package's modules.

Each subcommand lives in the module of its concern, which provides two functions:
``add_arguments(parser)`` and ``run(args) -> int``. This file only wires them together and turns
the package's own errors into one-line messages with exit status 2 (and what the operating system
refuses -- a full disk, a read-only folder, memory -- into one-line messages with exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("densenet.analyze", "parameters, shapes, MACs/FLOPs and connections of a model"),
    "download": ("densenet.download", "fetch CIFAR-10/100 (python version), verify its md5 and extract it safely"),
    "export": ("densenet.export", "export trained weights to ONNX and check them against PyTorch in ONNX Runtime"),
    "train": ("densenet.train", "train a DenseNet (recipes, resumable checkpoints, CPU or CUDA)"),
    "evaluate": ("densenet.evaluate", "loss, top-1/top-5, per-class accuracy and confusion matrix of trained weights"),
    "predict": ("densenet.predict", "top-k classes of image files with trained weights"),
    "bench": ("densenet.bench", "images/s and peak memory of a training step or inference (synthetic inputs)"),
    "compare": ("densenet.compare", "models side by side: params, MACs, training memory, images/s, accuracy"),
    "sweep": ("densenet.sweep", "one training run per value of a model parameter (resumable), table and plots"),
    "report": ("densenet.report", "one self-contained HTML page about training runs (curves, metrics, maps)"),
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand; the arguments (and modules) of ``commands`` only, if given.

    A command's module (and with it torch) is imported only when its arguments are added, so
    ``densenet --help`` and ``densenet --version`` import no command at all.
    """
    from densenet import __version__

    parser = argparse.ArgumentParser(
        prog="densenet", description="DenseNet image classification on CIFAR-10 (PyTorch)."
    )
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if commands is None or name in commands:
            module = import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    from densenet.errors import DenseNetError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except DenseNetError as exc:
        print(f"densenet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"densenet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the file system said no: disk full, read-only, a file where a folder should be
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"densenet {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"densenet {args.command}: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
