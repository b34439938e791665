DROP TRIGGER IF EXISTS order_items_audit ON order_items;
DROP TRIGGER IF EXISTS orders_audit ON orders;
DROP TRIGGER IF EXISTS inventory_audit ON inventory;
DROP TRIGGER IF EXISTS products_audit ON products;
DROP TRIGGER IF EXISTS users_audit ON users;
DROP FUNCTION IF EXISTS audit_row();
