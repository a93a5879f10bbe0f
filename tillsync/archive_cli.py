"""``tillsync archive``: commands about the archive (``archive_records``)."""

from __future__ import annotations

import typer

from tillsync.archive_status import archive_status_command
from tillsync.dsfinvk_export import export_dsfinvk_command

archive_app = typer.Typer(help="The archive: completeness of each till's records, tax audit export.", no_args_is_help=True)
archive_app.command("status")(archive_status_command)
archive_app.command("export-dsfinvk")(export_dsfinvk_command)
