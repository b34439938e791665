DROP TRIGGER IF EXISTS mongo_outbox_notify ON mongo_outbox;
DROP FUNCTION IF EXISTS notify_mongo_outbox();
DROP TABLE IF EXISTS mongo_outbox;
