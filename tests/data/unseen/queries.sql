-- Monthly revenue report for the shop database.
CREATE TABLE IF NOT EXISTS customers (
    id          SERIAL PRIMARY KEY,
    name        VARCHAR(120) NOT NULL,
    email       VARCHAR(200) UNIQUE,
    country     CHAR(2) DEFAULT 'GB',
    created_at  TIMESTAMP NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders (
    id           SERIAL PRIMARY KEY,
    customer_id  INTEGER NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    status       VARCHAR(16) NOT NULL CHECK (status IN ('new', 'paid', 'shipped', 'refunded')),
    total_cents  BIGINT NOT NULL,
    placed_at    TIMESTAMP NOT NULL
);

CREATE INDEX IF NOT EXISTS orders_placed_idx ON orders (placed_at);

INSERT INTO customers (name, email, country) VALUES
    ('Ana Lopez', 'ana@example.com', 'ES'),
    ('Tomas Novak', 'tomas@example.org', 'CZ'),
    ('Mei Chen', 'mei@example.net', 'SG');

WITH monthly AS (
    SELECT date_trunc('month', o.placed_at) AS month,
           c.country,
           SUM(o.total_cents) / 100.0 AS revenue,
           COUNT(*) AS order_count
    FROM orders o
    JOIN customers c ON c.id = o.customer_id
    WHERE o.status IN ('paid', 'shipped')
      AND o.placed_at >= DATE '2026-01-01'
    GROUP BY 1, 2
)
SELECT month,
       country,
       revenue,
       order_count,
       ROUND(revenue / NULLIF(order_count, 0), 2) AS avg_order,
       RANK() OVER (PARTITION BY month ORDER BY revenue DESC) AS country_rank
FROM monthly
ORDER BY month DESC, revenue DESC
LIMIT 50;

UPDATE orders
SET status = 'refunded'
WHERE id IN (SELECT id FROM orders WHERE status = 'paid' AND total_cents < 0);

DELETE FROM customers
WHERE NOT EXISTS (SELECT 1 FROM orders WHERE orders.customer_id = customers.id)
  AND created_at < now() - INTERVAL '2 years';

SELECT c.name, COUNT(o.id) AS orders, COALESCE(SUM(o.total_cents), 0) AS spent
FROM customers c
LEFT JOIN orders o ON o.customer_id = c.id
GROUP BY c.name
HAVING COUNT(o.id) > 3
ORDER BY spent DESC;
