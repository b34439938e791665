-- Changes that must reach MongoDB, written in the transaction of the
-- PostgreSQL change that causes them (a transactional outbox): a price set
-- or changed appends to the product's price history, a deleted user's
-- profile is removed. The relay (service/outbox.rs) applies them in id order
-- and deletes them; nothing is lost when MongoDB is down, only delayed.
CREATE TABLE mongo_outbox (
    id         BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT        NOT NULL CONSTRAINT mongo_outbox_kind_check
                           CHECK (kind IN ('price_measurement', 'delete_profile')),
    payload    JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Wakes the relays (LISTEN mongo_outbox) when the inserting transaction commits.
CREATE FUNCTION notify_mongo_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mongo_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER mongo_outbox_notify AFTER INSERT ON mongo_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_mongo_outbox();
