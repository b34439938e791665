DROP TABLE IF EXISTS audit_log;
DROP TABLE IF EXISTS product_searches;
