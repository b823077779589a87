"""The migration-rollback toolkit. The scripts are thin; the logic lives here.

The Python API of seed 000 is importable from here (and from rollback_manager):
``from lib import RollbackManager, MigrationTransaction, RollbackType, MigrationBackup``
(asynchronous, as the seed shows them), and their synchronous twins
``SyncRollbackManager``, ``SyncMigrationTransaction``, ``SyncMigrationBackup``.

Layers, each importing only the ones below it:

    lib/cli         what people see: parsing, the console, rendering, the demo
    lib/api         the Python API
    lib/migrate     migrations with rollback built in
    lib/operations  the commands and the one operation scaffold
    lib/restore     putting staging back: swap, in place, partial, diff, reset, leftovers
    lib/undo        one run's changes captured and reverted (beside lib/restore)
    lib/points      the catalog of points and the methods that take them
    lib/pg          servers, client tools, processes, connections, locks
    lib (files)     errors, config, ports, audit, files, faults: the foundation
"""

__all__ = [  # the names of lib/api.py's __all__, importable from here without loading it first
    "MigrationBackup",
    "MigrationTransaction",
    "RollbackManager",
    "RollbackType",
    "SyncMigrationBackup",
    "SyncMigrationTransaction",
    "SyncRollbackManager",
    "Verification",
]


def __getattr__(name: str):
    # Loaded on first use, so that scripts importing one module of lib stay quick to start.
    if name in __all__:
        from lib import api

        return getattr(api, name)
    raise AttributeError(f"module 'lib' has no attribute {name!r}")
