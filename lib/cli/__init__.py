"""What people see: the scripts' common flags, logging and exit codes (app), the
console that is the scripts' Reporter and their Confirmers (console), tables and
detail views (render), the interactive advanced rollback, the demo and its sample
data, and the toolkit's own background work (background).

May import every layer; nothing imports it but the scripts."""
