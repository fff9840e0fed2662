CREATE ROLE airlock_app LOGIN PASSWORD 'change-me'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;

-- Connect, and nothing else at the database level.
REVOKE ALL ON DATABASE appdb FROM PUBLIC;
GRANT CONNECT ON DATABASE appdb TO airlock_app;
-- Airlock's own schema, owned by its role: it creates and migrates its ledger there.
-- PostgreSQL checks CREATE on the database even for CREATE SCHEMA IF NOT EXISTS, so
-- the schema must exist before Airlock first connects.
CREATE SCHEMA airlock AUTHORIZATION airlock_app;
-- The tables agents may write, and nothing else.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO airlock_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.customers, public.orders TO airlock_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO airlock_app;

