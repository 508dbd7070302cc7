"""``stethoscope dashboards export DIR`` and ``stethoscope dashboards push --grafana-url URL``.

Wired into ``stethoscope.cli`` like ``drift``: ``add_arguments(parser)`` then
``set_defaults(func=run)``.

Examples:
    >>> import argparse
    >>> args = add_arguments(argparse.ArgumentParser()).parse_args(["push", "--grafana-url", "http://g:3000"])
    >>> args.action, args.grafana_url, args.folder
    ('push', 'http://g:3000', 'Stethoscope')
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from .provisioning import FOLDER
from .push import export, push

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` and ``push`` actions to ``parser`` (a subcommand parser) and return it."""
    actions = parser.add_subparsers(dest="action", required=True)
    ex = actions.add_parser("export", help="write dashboards/json/*.json and the provisioning files under DIR")
    ex.add_argument("dir", help="output directory")
    pu = actions.add_parser("push", help="upsert the dashboards into a running Grafana (needs the dashboards extra)")
    pu.add_argument("--grafana-url", required=True,
                    help="Grafana base URL, credentials allowed: http://admin:admin@grafana:3000")
    pu.add_argument("--folder", default=FOLDER, help=f"folder title (default: {FOLDER})")
    pu.add_argument("--token-env", default="GRAFANA_TOKEN",
                    help="environment variable holding an API token, used when set (default: GRAFANA_TOKEN)")
    return parser


def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run the action in ``args``; errors propagate as :class:`~stethoscope.errors.StethoscopeError`."""
    out = out or sys.stdout
    if args.action == "export":
        for path in export(args.dir):
            print(path, file=out)
        return 0
    token = os.environ.get(args.token_env) or None
    result = push(args.grafana_url, folder=args.folder, credential=token)
    if result.folder_created:
        print(f"created folder {args.folder!r} (uid {result.folder_uid})", file=out)
    for uid, url in result.dashboards:
        print(f"{uid}\t{url}", file=out)
    return 0
