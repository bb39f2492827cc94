-- Devices known to the gateway (enabled = allowed to connect) and their session history.
CREATE TABLE devices (
  imei       bigint      PRIMARY KEY,
  enabled    boolean     NOT NULL DEFAULT true,
  name       text,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE device_sessions (
  id        bigserial   PRIMARY KEY,
  imei      bigint      NOT NULL,
  event     text        NOT NULL CHECK (event IN ('connect', 'disconnect')),
  at        timestamptz NOT NULL,
  shard     integer     NOT NULL,
  transport text        NOT NULL,
  peer      text,
  reason    text
);

CREATE INDEX device_sessions_imei_at ON device_sessions (imei, at);
