"""`vlm` console script. Each sub-command is one module of this package exposing add_arguments(parser) and
run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module. A module that is not present yet is simply not offered.
COMMANDS = {
    "inspect": "vlm.cli.inspect",
    "generate": "vlm.cli.generate",
    "convert": "vlm.cli.convert",
    "quantize": "vlm.cli.quantize",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlm", description="Multimodal LLM inference on GGUF files")
    sub = parser.add_subparsers(dest="command", required=True)
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and modname.startswith(e.name):
                continue
            raise
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(p)
        mods[name] = mod
    args = parser.parse_args(argv)
    return int(mods[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
