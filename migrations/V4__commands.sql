-- The command ledger: every command posted to the API, its state and the device's answer.
-- States: queued -> sent -> completed | failed; queued -> expired | superseded | cancelled;
-- sent -> queued again (no answer in time, or the session ended) until attempts run out.
CREATE TABLE commands (
  id            bigserial   PRIMARY KEY,
  imei          bigint      NOT NULL,
  codec         smallint    NOT NULL CHECK (codec IN (12, 14)),
  -- The text as posted, when it was posted as text; `payload` is what travels either way.
  command       text,
  payload       bytea       NOT NULL,
  metadata      jsonb       NOT NULL DEFAULT '{}',
  priority      integer     NOT NULL DEFAULT 0,
  state         text        NOT NULL DEFAULT 'queued'
                CHECK (state IN ('queued', 'sent', 'completed', 'failed', 'expired',
                                 'superseded', 'cancelled')),
  attempts      integer     NOT NULL DEFAULT 0,
  created_at    timestamptz NOT NULL DEFAULT now(),
  expires_at    timestamptz,
  sent_at       timestamptz,
  finished_at   timestamptz,
  response      text,
  error         text,
  -- The gateway holding it in flight (state 'sent').
  sent_by       text,
  superseded_by bigint
);

-- What the dispatcher asks: the next queued command of a device, highest priority first.
CREATE INDEX commands_queued ON commands (imei, priority DESC, id) WHERE state = 'queued';
-- A device's history, newest first.
CREATE INDEX commands_by_imei ON commands (imei, id DESC);
-- Commands in flight (one per device at a time), and expiry of queued ones.
CREATE INDEX commands_sent ON commands (imei) WHERE state = 'sent';
CREATE INDEX commands_expiring ON commands (expires_at) WHERE state = 'queued';
