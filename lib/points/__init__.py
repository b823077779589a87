"""Rollback points: the catalog on disk (manifests, read and written there only, as
manifest.py's typed records; checksums; the records of databases about to be
created), the methods that take a point (methods/: template, dump, data), encryption
of their files, the background spare copy and retention.

May import lib.pg and the foundation."""
