-- The tables of the demo's target database (and a starting point for a sandbox).
-- Plain SQL that SQLite and PostgreSQL both run: the demo's SQLite target and the
-- docker-compose sandbox's PostgreSQL (examples/compose/) start from this file.
CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT UNIQUE,
    tier TEXT NOT NULL DEFAULT 'standard'
);
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    total_cents INTEGER NOT NULL CHECK (total_cents >= 0),
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    message TEXT NOT NULL
);
INSERT INTO audit_log (id, at, message) VALUES (1, '2026-11-01T00:00:00Z', 'sandbox created')
    ON CONFLICT (id) DO NOTHING;
