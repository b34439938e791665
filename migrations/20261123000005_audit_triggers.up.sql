-- Every write to users, products, inventory, orders and order_items is
-- recorded in audit_log by a row trigger, in the writing transaction: a write
-- and its audit row commit or roll back together, and no write path can
-- forget one.
--
-- The service names the caller and the request id of each write transaction
-- with set_config('datagate.actor', ..., true) and
-- set_config('datagate.request_id', ..., true) (transaction-local).
-- Writes made outside the service are recorded too, with the actor
-- 'db:<session role>' and no request id.
--
-- Values are the whole row as JSONB, without secrets (password_hash) and
-- derived data (search_vector); a password change shows as
-- "password_changed": true. Setting users.deleted_at (a soft delete) is
-- recorded as a 'delete'. Updates that change nothing are not recorded.

CREATE FUNCTION audit_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- The column holding the record id, given as the trigger's argument.
    id_column  TEXT := TG_ARGV[0];
    actor      TEXT := COALESCE(NULLIF(current_setting('datagate.actor', true), ''),
                                'db:' || session_user);
    request_id TEXT := NULLIF(current_setting('datagate.request_id', true), '');
    action     TEXT := lower(TG_OP);
    old_row    JSONB;
    new_row    JSONB;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_row := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_row := to_jsonb(NEW);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF old_row = new_row THEN
            RETURN NULL;
        END IF;
        IF old_row -> 'password_hash' IS DISTINCT FROM new_row -> 'password_hash' THEN
            new_row := new_row || '{"password_changed": true}';
        END IF;
        IF old_row ? 'deleted_at' AND old_row ->> 'deleted_at' IS NULL
           AND new_row ->> 'deleted_at' IS NOT NULL THEN
            action := 'delete';
        END IF;
    END IF;
    INSERT INTO audit_log (table_name, record_id, action, actor, request_id, old_values, new_values)
    VALUES (
        TG_TABLE_NAME,
        (COALESCE(new_row, old_row) ->> id_column)::bigint,
        action,
        actor,
        request_id,
        old_row - 'password_hash' - 'search_vector',
        new_row - 'password_hash' - 'search_vector'
    );
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_audit AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION audit_row('id');
CREATE TRIGGER products_audit AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH ROW EXECUTE FUNCTION audit_row('id');
CREATE TRIGGER inventory_audit AFTER INSERT OR UPDATE OR DELETE ON inventory
    FOR EACH ROW EXECUTE FUNCTION audit_row('product_id');
CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION audit_row('id');
CREATE TRIGGER order_items_audit AFTER INSERT OR UPDATE OR DELETE ON order_items
    FOR EACH ROW EXECUTE FUNCTION audit_row('id');
