-- A staging database with everything a restore must bring back exactly. Core
-- PostgreSQL only: the contrib extensions (citext, hstore, pg_trgm) come from
-- rich_schema_contrib.sql where the server has them.

CREATE SCHEMA "Sales Ops";
COMMENT ON SCHEMA "Sales Ops" IS 'schema with a space and capitals';

CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE DOMAIN positive_money AS numeric(12, 2) CHECK (VALUE >= 0);

CREATE TABLE customers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL,
    tags        jsonb,
    profile     jsonb DEFAULT '{}'::jsonb,
    name_upper  text GENERATED ALWAYS AS (upper(name)) STORED,
    created_at  timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00'
);
COMMENT ON TABLE customers IS 'migrated from V2 客户';

CREATE TABLE "Sales Ops"."Order ""Lines"" Ü" (
    id          serial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    status      order_status NOT NULL DEFAULT 'new',
    amount      positive_money NOT NULL,
    "Qty Ordered" integer CHECK ("Qty Ordered" > 0),
    note        text
);
CREATE INDEX customers_name ON customers (name);
CREATE INDEX "idx order lines status" ON "Sales Ops"."Order ""Lines"" Ü" (status) WHERE status <> 'cancelled';

CREATE TABLE measurements (
    logdate date NOT NULL,
    city    text NOT NULL,
    reading double precision
) PARTITION BY RANGE (logdate);
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');

CREATE TABLE parent_log (id int, msg text);
CREATE TABLE child_log (extra text) INHERITS (parent_log);

CREATE UNLOGGED TABLE scratch (k text PRIMARY KEY, v bytea);

CREATE SEQUENCE invoice_no START 1000 INCREMENT 7;

CREATE TABLE audit_events (id bigserial PRIMARY KEY, what text, at timestamptz DEFAULT now());

CREATE FUNCTION log_customer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit_events (what) VALUES (TG_OP || ' ' || NEW.email);
  RETURN NEW;
END $$;
CREATE TRIGGER customers_audit AFTER INSERT OR UPDATE ON customers
  FOR EACH ROW EXECUTE FUNCTION log_customer();

CREATE FUNCTION "Order Total"(cid bigint) RETURNS numeric LANGUAGE sql STABLE AS
  $$ SELECT coalesce(sum(amount), 0) FROM "Sales Ops"."Order ""Lines"" Ü" WHERE customer_id = cid $$;
CREATE PROCEDURE touch_customer(cid bigint) LANGUAGE sql AS $$ UPDATE customers SET name = name WHERE id = cid $$;

CREATE VIEW customer_totals AS
  SELECT c.id, c.email, "Order Total"(c.id) AS total FROM customers c;
CREATE MATERIALIZED VIEW city_stats AS
  SELECT city, count(*) AS n, avg(reading) AS avg_reading FROM measurements GROUP BY city;
COMMENT ON MATERIALIZED VIEW city_stats IS 'refreshed nightly';

CREATE TABLE documents (id serial PRIMARY KEY, owner_name text NOT NULL, body text);
ALTER TABLE documents ENABLE ROW LEVEL SECURITY;
CREATE POLICY documents_owner ON documents USING (owner_name = current_user);
CREATE POLICY documents_reader ON documents FOR SELECT TO rollback_test_reader USING (true);
GRANT SELECT ON documents TO rollback_test_reader;

CREATE TABLE attachments (id serial PRIMARY KEY, lo oid);

-- data
INSERT INTO customers (email, name, tags, profile)
SELECT format('User%s@Example.com', g), format('Kunde Nº %s ✓', g),
       jsonb_build_object('tier', (g % 3)::text), jsonb_build_object('n', g, 'vip', g % 10 = 0)
  FROM generate_series(1, 300) g;
INSERT INTO "Sales Ops"."Order ""Lines"" Ü" (customer_id, status, amount, "Qty Ordered", note)
SELECT (g % 300) + 1, (ARRAY['new', 'paid', 'shipped', 'cancelled']::order_status[])[(g % 4) + 1],
       (g * 1.25)::numeric(12, 2), (g % 5) + 1, CASE WHEN g % 7 = 0 THEN NULL ELSE 'note ' || g END
  FROM generate_series(1, 1200) g;
INSERT INTO measurements
SELECT DATE '2024-01-01' + (g % 700), (ARRAY['Taipei', 'Kaohsiung', 'Tainan'])[(g % 3) + 1], g / 10.0
  FROM generate_series(1, 2000) g;
INSERT INTO parent_log VALUES (1, 'parent row');
INSERT INTO child_log VALUES (2, 'child row', 'extra');
INSERT INTO scratch SELECT 'k' || g, decode(md5(g::text), 'hex') FROM generate_series(1, 50) g;
SELECT setval('invoice_no', 1077, true);
INSERT INTO documents (owner_name, body) VALUES ('alice', 'secret'), ('bob', 'public');
INSERT INTO attachments (lo) SELECT lo_from_bytea(0, convert_to('attachment ' || g, 'UTF8')) FROM generate_series(1, 3) g;
REFRESH MATERIALIZED VIEW city_stats;
