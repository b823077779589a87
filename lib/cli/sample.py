"""Sample databases for the demo and the tests: a legacy V2 with clients (some of
which fail validation) and a staging database with customers, products and orders."""

from __future__ import annotations


# 3,060 clients. About 4% have no phone (always refused), 60 re-enter an existing
# client code (refused as duplicates), and from client 1,500 on every fourth one has
# no e-mail address: refused only in strict mode, where the failure rate passes 10%
# after about twenty committed batches.
def v2_sql(clients: int = 3000) -> str:
    """The V2 sample with ``clients`` clients (plus one re-entered per 50)."""
    half = clients // 2
    return f"""
CREATE TABLE clients (
    id serial PRIMARY KEY,
    client_code text NOT NULL,
    name text NOT NULL,
    phone text,
    email text,
    address text,
    created_at timestamptz NOT NULL
);
INSERT INTO clients (client_code, name, phone, email, address, created_at)
SELECT 'CL' || lpad(g::text, 5, '0'),
       'Client ' || g,
       CASE WHEN g % 25 = 0 THEN NULL ELSE '+886-2-' || lpad((g * 7919 % 10000000)::text, 7, '0') END,
       CASE WHEN g > {half} AND g % 4 = 0 THEN NULL ELSE 'client' || g || '@example.tw' END,
       g || ' Zhongshan Road, Taipei',
       TIMESTAMPTZ '2020-01-01 00:00+00' + g * INTERVAL '1 hour'
  FROM generate_series(1, {clients}) g;
INSERT INTO clients (client_code, name, phone, email, address, created_at)
SELECT 'CL' || lpad(g::text, 5, '0'), 'Client ' || g || ' (entered twice)', '+886-2-0000000', NULL,
       'unknown', TIMESTAMPTZ '2024-01-01 00:00+00' + g * INTERVAL '1 minute'
  FROM generate_series(10, {clients}, 50) g;
"""


V2 = v2_sql()

STAGING = """
CREATE TABLE customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code text NOT NULL UNIQUE,
    name text NOT NULL,
    phone text NOT NULL,
    email text UNIQUE,
    address text,
    legacy_id integer UNIQUE,
    profile jsonb NOT NULL DEFAULT '{}',
    migrated_at timestamptz
);
CREATE TABLE products (
    id serial PRIMARY KEY,
    code text NOT NULL UNIQUE,
    name text NOT NULL,
    price numeric(12, 4) NOT NULL
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id),
    product_id integer NOT NULL REFERENCES products (id),
    amount numeric(12, 2) NOT NULL,
    placed_at timestamptz NOT NULL
);
CREATE INDEX orders_customer ON orders (customer_id);
CREATE VIEW customer_totals AS
    SELECT c.id, c.name, sum(o.amount) AS total FROM customers c LEFT JOIN orders o ON o.customer_id = c.id GROUP BY c.id;
INSERT INTO customers (code, name, phone, email, profile)
    SELECT 'S' || lpad(g::text, 5, '0'), 'Customer ' || g, '+886-3-' || lpad(g::text, 7, '0'),
           'customer' || g || '@example.com', jsonb_build_object('tier', g % 3)
      FROM generate_series(1, 2000) g;
INSERT INTO products (code, name, price)
    SELECT 'P' || lpad(g::text, 4, '0'), 'Product ' || g, round((g * 1.23456)::numeric, 4) FROM generate_series(1, 500) g;
INSERT INTO orders (customer_id, product_id, amount, placed_at)
    SELECT (g % 2000) + 1, (g % 500) + 1, (g % 997) * 1.5, TIMESTAMPTZ '2024-01-01 00:00+00' + g * INTERVAL '1 minute'
      FROM generate_series(1, 20000) g;
"""
