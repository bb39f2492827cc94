-- Events and their delivery (src/control/events): a durable outbox that webhooks are sent from.
-- (V4 is the command ledger.)

-- Devices whose telemetry is published as events under telemetry_events = "opted_in".
ALTER TABLE devices ADD COLUMN telemetry_events boolean NOT NULL DEFAULT false;

-- The outbox: one row per event, inserted in the transaction of what it reports (a session
-- event, a commit of telemetry, a command's state change), so an event exists if and only if
-- that committed. `tx` is the inserting transaction's id: ids are taken before commit, so a
-- smaller id can become visible after a larger one; a deliverer reads only rows whose `tx` is
-- older than every running transaction (pg_snapshot_xmin), in (tx, id) order, and so never
-- skips a row that commits late.
CREATE TABLE events (
  tx    bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
  id    bigserial   NOT NULL,
  topic text        NOT NULL,
  imei  bigint      NOT NULL,
  at    timestamptz NOT NULL DEFAULT now(),
  data  json        NOT NULL,
  PRIMARY KEY (tx, id)
);

-- Delivery state, one row per route (the `name` of a [[routes]] table): how far it is
-- delivered (every matching event at or before (cursor_tx, cursor_id) was answered 2xx), and
-- which gateway holds its lease (only the holder sends the route's events, until
-- lease_until). seen_at: last time a gateway had the route configured; routes unseen for a
-- day no longer hold back the pruning of delivered events.
CREATE TABLE event_routes (
  route       text        PRIMARY KEY,
  cursor_tx   bigint      NOT NULL DEFAULT 0,
  cursor_id   bigint      NOT NULL DEFAULT 0,
  owner       text,
  lease_until timestamptz,
  seen_at     timestamptz NOT NULL DEFAULT now()
);

-- Wakes the deliverers at the commit of any transaction that inserted events (once per
-- transaction: PostgreSQL folds identical notifications); they also poll, in case a
-- notification is missed while their listening connection is down.
CREATE FUNCTION fleetgate_events_notify() RETURNS trigger
  LANGUAGE plpgsql
  AS $fn$
BEGIN
  PERFORM pg_notify('fleetgate_events', '');
  RETURN NULL;
END
$fn$;

CREATE TRIGGER events_notify AFTER INSERT ON events
  FOR EACH STATEMENT EXECUTE FUNCTION fleetgate_events_notify();
