"""``python -m backupd``: the same as the ``backupd`` command."""

from backupd.cli import main

main()
