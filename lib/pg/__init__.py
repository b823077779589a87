"""Servers, client tools and connections: psycopg2 sessions and server facts
(db), the SQLSTATEs decided on (codes), the choice of client tools by major
(tools), locks, retries, fingerprints of a database, the progress of long work as
the server and the tools tell it (progress), the staging target and its V2 guard.

May import the foundation (lib.errors, lib.config, lib.files, lib.interaction,
lib.faults, lib.process, lib.logfiles) and nothing else of the toolkit."""
