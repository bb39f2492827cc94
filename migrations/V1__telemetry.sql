-- Telemetry: one row per AVL record, partitioned by day (UTC) on the device's timestamp.
-- Column order is the binary COPY order of the writer (src/sink): do not reorder.
CREATE TABLE telemetry (
  imei        bigint           NOT NULL,
  ts          timestamptz      NOT NULL,  -- time the device claims
  received_at timestamptz      NOT NULL,  -- time the gateway decoded it
  codec       smallint         NOT NULL,  -- 8, 142 (0x8E), 16
  priority    smallint         NOT NULL,
  lat         double precision NOT NULL,  -- degrees
  lon         double precision NOT NULL,
  alt         smallint         NOT NULL,
  angle       integer          NOT NULL,
  sats        smallint         NOT NULL,
  speed       integer          NOT NULL,
  event_io    integer          NOT NULL,
  gen_type    smallint,                   -- codec 16 only
  io_ids      integer[]        NOT NULL,  -- fixed-width IO ids, wire order
  io_values   bigint[]         NOT NULL,  -- their values (u64 bit pattern as bigint)
  nx_ids      integer[]        NOT NULL,  -- codec 8E variable-length IO ids, wire order
  nx_values   bytea[]          NOT NULL,
  rec_hash    bigint           NOT NULL,  -- hash of the record's wire bytes: dedup of resends
  UNIQUE (imei, ts, rec_hash)
) PARTITION BY RANGE (ts);

-- Catch-all for times outside the daily partitions: 1970, 2000, GPS week rollover times.
CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;

-- The value of IO element `id` of a row, or NULL: io_value(io_ids, io_values, 239).
CREATE FUNCTION io_value(ids integer[], vals bigint[], id integer) RETURNS bigint
  LANGUAGE sql IMMUTABLE PARALLEL SAFE
  AS $$ SELECT vals[array_position(ids, id)] $$;

-- Create the daily partitions telemetry_pYYYYMMDD (UTC days) from yesterday to
-- today + ahead_days, moving rows of those days out of telemetry_default first (creating a
-- partition fails while the default partition holds rows of its range); then drop the daily
-- partitions whose whole day is older than now() - retention_days (0: keep forever). The
-- default partition is never dropped. All in the caller's transaction.
CREATE FUNCTION fleetgate_maintain_partitions(ahead_days int, retention_days int)
  RETURNS TABLE (created int, dropped int)
  LANGUAGE plpgsql
  AS $fn$
DECLARE
  v_today  date := (now() AT TIME ZONE 'UTC')::date;
  v_day    date;
  v_part   text;
  v_lo     timestamptz;
  v_hi     timestamptz;
  v_locked boolean := false;
  r        record;
BEGIN
  created := 0;
  dropped := 0;

  FOR i IN -1 .. ahead_days LOOP
    v_day := v_today + i;
    v_part := 'telemetry_p' || to_char(v_day, 'YYYYMMDD');
    CONTINUE WHEN EXISTS (
      SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
       WHERE i.inhparent = 'telemetry'::regclass AND c.relname = v_part);
    IF NOT v_locked THEN
      -- Block writers (and other maintainers) for the rest of the transaction, parent first
      -- so that we never wait on a partition while holding it, as writers lock the same way.
      LOCK TABLE telemetry IN SHARE ROW EXCLUSIVE MODE;
      v_locked := true;
    END IF;
    v_lo := v_day::timestamp AT TIME ZONE 'UTC';
    v_hi := (v_day + 1)::timestamp AT TIME ZONE 'UTC';
    IF EXISTS (SELECT 1 FROM telemetry_default WHERE ts >= v_lo AND ts < v_hi) THEN
      -- Dynamic SQL throughout: the temp table is created anew for each day.
      EXECUTE 'CREATE TEMP TABLE fleetgate_moving (LIKE telemetry) ON COMMIT DROP';
      EXECUTE 'WITH moved AS (DELETE FROM telemetry_default WHERE ts >= $1 AND ts < $2 RETURNING *)
               INSERT INTO fleetgate_moving SELECT * FROM moved' USING v_lo, v_hi;
      EXECUTE format('CREATE TABLE %I PARTITION OF telemetry FOR VALUES FROM (%L) TO (%L)',
                     v_part, v_lo, v_hi);
      EXECUTE 'INSERT INTO telemetry SELECT * FROM fleetgate_moving';
      EXECUTE 'DROP TABLE fleetgate_moving';
    ELSE
      EXECUTE format('CREATE TABLE %I PARTITION OF telemetry FOR VALUES FROM (%L) TO (%L)',
                     v_part, v_lo, v_hi);
    END IF;
    created := created + 1;
  END LOOP;

  IF retention_days > 0 THEN
    FOR r IN
      SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
       WHERE i.inhparent = 'telemetry'::regclass
         AND c.relname ~ '^telemetry_p[0-9]{8}$'
       ORDER BY c.relname
    LOOP
      -- The partition's day ends at the next UTC midnight; drop it once that end is older
      -- than the retention window.
      CONTINUE WHEN (to_date(substr(r.relname, 12), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                    > now() - make_interval(days => retention_days);
      IF NOT v_locked THEN
        LOCK TABLE telemetry IN SHARE ROW EXCLUSIVE MODE;
        v_locked := true;
      END IF;
      EXECUTE format('DROP TABLE %I', r.relname);
      dropped := dropped + 1;
    END LOOP;
  END IF;

  RETURN NEXT;
END
$fn$;
