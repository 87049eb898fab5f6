"""The `inserve` command: export models, serve, index, search, stats, delete, whiten, eval."""

from __future__ import annotations

import argparse
import sys

from inserve.clients.local_commands import add_local_commands
from inserve.clients.remote_commands import add_remote_commands
from inserve.server.logs import FORMATS, configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inserve", description="Instance-search inference service")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--log-format", default="text", choices=FORMATS, help="json: one JSON object a line")
    sub = parser.add_subparsers(dest="command", required=True)
    add_local_commands(sub)
    add_remote_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    import grpc

    from inserve.engines import EngineUnavailable
    from inserve.server.config import ConfigError
    from inserve.server.models import ModelsError

    try:
        return args.fn(args)
    except ConfigError as exc:  # flags that cannot work together: one line saying what is valid
        print(f"inserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # refused calls the command does not explain itself (auth, limits...)
        print(f"inserve {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ModelsError, EngineUnavailable) as exc:  # no export, no device
        print(f"inserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that is missing, a directory, or unreadable
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"inserve {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
