"""The migration-rollback toolkit. The scripts are thin; the logic lives here.

The Python API of seed 000 is importable from here (and from rollback_manager):
``from lib import RollbackManager, MigrationTransaction, RollbackType, MigrationBackup``.
"""

__all__ = ["MigrationBackup", "MigrationTransaction", "RollbackManager", "RollbackType", "Verification"]


def __getattr__(name: str):
    # Loaded on first use, so that scripts importing one module of lib stay quick to start.
    if name in __all__:
        from lib.__init__ import api

        return getattr(api, name)
    raise AttributeError(f"module 'lib' has no attribute {name!r}")
