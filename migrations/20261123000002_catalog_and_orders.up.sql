-- Products, inventory, orders, order items, and idempotency keys.
--
-- Money is NUMERIC (exact); the API speaks integer cents. Every foreign key
-- has an index whose leading column is the referencing column.

CREATE TABLE products (
    id           BIGINT        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sku          TEXT          NOT NULL CHECK (char_length(sku) BETWEEN 1 AND 64),
    title        TEXT          NOT NULL CHECK (char_length(title) BETWEEN 1 AND 200),
    description  TEXT          NOT NULL DEFAULT '' CHECK (char_length(description) <= 5000),
    category     TEXT          NOT NULL CHECK (char_length(category) BETWEEN 1 AND 64),
    price        NUMERIC(12,2) NOT NULL CONSTRAINT products_price_check CHECK (price >= 0),
    rating       NUMERIC(3,2)  NOT NULL DEFAULT 0 CHECK (rating BETWEEN 0 AND 5),
    review_count INTEGER       NOT NULL DEFAULT 0 CHECK (review_count >= 0),
    created_at   TIMESTAMPTZ   NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ   NOT NULL DEFAULT now(),
    version      BIGINT        NOT NULL DEFAULT 1
);

CREATE UNIQUE INDEX products_sku_key ON products (lower(sku));
CREATE INDEX products_category_idx ON products (category);

CREATE TABLE inventory (
    product_id BIGINT      PRIMARY KEY REFERENCES products (id) ON DELETE CASCADE,
    quantity   INTEGER     NOT NULL CONSTRAINT inventory_quantity_check CHECK (quantity >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id           BIGINT        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_number TEXT          NOT NULL GENERATED ALWAYS AS ('ORD-' || lpad(id::text, 10, '0')) STORED,
    user_id      BIGINT        NOT NULL REFERENCES users (id),
    status       TEXT          NOT NULL DEFAULT 'pending'
                               CONSTRAINT orders_status_check
                               CHECK (status IN ('pending', 'processing', 'completed', 'cancelled')),
    total        NUMERIC(14,2) NOT NULL CHECK (total >= 0),
    created_at   TIMESTAMPTZ   NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ   NOT NULL DEFAULT now(),
    version      BIGINT        NOT NULL DEFAULT 1
);

CREATE UNIQUE INDEX orders_order_number_key ON orders (order_number);
-- A user's orders newest first: the foreign key, ListOrders by user, and the
-- per-user "recent orders" of ListUsersWithOrders.
CREATE INDEX orders_user_recent_idx ON orders (user_id, created_at DESC, id DESC);
CREATE INDEX orders_recent_idx ON orders (created_at DESC, id DESC);
CREATE INDEX orders_status_recent_idx ON orders (status, created_at DESC, id DESC);

CREATE TABLE order_items (
    id         BIGINT        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   BIGINT        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id BIGINT        NOT NULL REFERENCES products (id),
    quantity   INTEGER       NOT NULL CONSTRAINT order_items_quantity_check CHECK (quantity > 0),
    unit_price NUMERIC(12,2) NOT NULL CHECK (unit_price >= 0),
    subtotal   NUMERIC(14,2) GENERATED ALWAYS AS (quantity * unit_price) STORED,
    -- One line per product; also the index for the foreign key on order_id.
    CONSTRAINT order_items_order_product_key UNIQUE (order_id, product_id)
);

CREATE INDEX order_items_product_idx ON order_items (product_id);

-- A caller's request id and the response it got, so a retried create
-- returns the first response. The row is inserted first, in the create's
-- transaction: a concurrent retry waits on it, then reads the response.
CREATE TABLE idempotency_keys (
    caller      TEXT        NOT NULL,
    key         TEXT        NOT NULL,
    -- SHA-256 of the canonical request; another payload under the same key is refused.
    fingerprint TEXT        NOT NULL,
    response    JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (caller, key)
);

CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
