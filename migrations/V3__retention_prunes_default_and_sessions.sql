-- Retention also covers the rows no daily partition drop removes: those of the default
-- partition (1970, 2000, GPS rollover times) and the session history. Same signature and result
-- as V1's function, so that a gateway still calling it the V1 way prunes too.

-- The retention delete looks sessions up by time alone; (imei, at) does not serve it.
CREATE INDEX device_sessions_at ON device_sessions (at);

-- As in V1, then, when retention_days > 0, delete the rows of telemetry_default and of
-- device_sessions whose whole UTC day is older than now() - retention_days: the rule by which
-- daily partitions are dropped, so that a day's rows go at once wherever they are. How many
-- rows went is left in the transaction-local settings fleetgate.pruned_telemetry_default and
-- fleetgate.pruned_device_sessions (unset when retention is 0), for the caller to report.
CREATE OR REPLACE FUNCTION fleetgate_maintain_partitions(ahead_days int, retention_days int)
  RETURNS TABLE (created int, dropped int)
  LANGUAGE plpgsql
  AS $fn$
DECLARE
  v_today  date := (now() AT TIME ZONE 'UTC')::date;
  v_day    date;
  v_part   text;
  v_lo     timestamptz;
  v_hi     timestamptz;
  v_cutoff timestamptz;
  v_pruned bigint;
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

    -- The UTC midnight that began the day of now() - retention_days: a row before it is on a
    -- day that ended by now() - retention_days, as a dropped daily partition's day has. No lock
    -- on telemetry: deleting rows of the default partition conflicts with no writer's inserts.
    v_cutoff := ((now() - make_interval(days => retention_days)) AT TIME ZONE 'UTC')::date::timestamp
                AT TIME ZONE 'UTC';
    DELETE FROM telemetry_default WHERE ts < v_cutoff;
    GET DIAGNOSTICS v_pruned = ROW_COUNT;
    PERFORM set_config('fleetgate.pruned_telemetry_default', v_pruned::text, true);
    DELETE FROM device_sessions WHERE at < v_cutoff;
    GET DIAGNOSTICS v_pruned = ROW_COUNT;
    PERFORM set_config('fleetgate.pruned_device_sessions', v_pruned::text, true);
  END IF;

  RETURN NEXT;
END
$fn$;
