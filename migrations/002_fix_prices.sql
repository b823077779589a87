-- Round product prices to whole cents (the V2 import kept four decimals).
-- Runs as one unit. --limit N fixes at most N products: it arrives as the setting
-- migration.limit ('' when there is no limit, and LIMIT NULL means no limit).
UPDATE products
   SET price = round(price, 2)
 WHERE id IN (SELECT id FROM products
               WHERE price <> round(price, 2)
               ORDER BY id
               LIMIT NULLIF(current_setting('migration.limit'), '')::bigint);
