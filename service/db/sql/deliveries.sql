-- The webhook path's statements (`service/db/deliveries.py`), sent to asyncpg directly
-- (`db/driver.py` says why, and how this file is read). Rows come as one JSON parameter, so
-- the text is the same for one row or a thousand: PostgreSQL prepares it once.
--
-- Literals here spell Python constants, as PostgreSQL must see them to match a partial
-- index's predicate: outcomes (`DeliveryOutcome`), states (`SubscriptionState`), the shared
-- predicates and RECEIVED_WEEK (`db/tables.py`), the event columns (`TrackEvent`).
-- tests/test_named_sql.py holds them to those.

-- name: insert_originals_and_lock
-- The receiver's first statement: its originals, then the subscriptions of their packages
-- locked, in one round trip (copies, which lock nothing, are not among them). The rows of both
-- come back as one result, told apart by `kind`.
-- Rows read from JSON are matched to a table through `= ANY(ARRAY(...))`, here and below: the
-- planner cannot count JSON's rows (it assumes 100), and against a small table it would rather
-- read all of it than probe its index 100 times (a whole scan of 10,000 subscriptions for every
-- batch, seen in the plans); an array of unknown length it assumes short.
WITH originals AS (
    {insert_originals}
),
live AS MATERIALIZED (
    {live}
    WHERE tracking_number = ANY(ARRAY(SELECT tracking_number FROM originals))
      AND state <> 'stopped'
    ORDER BY id
    FOR NO KEY UPDATE
)
SELECT 'original' AS kind, id AS delivery_id, content_sha256, outcome, subscription_id,
       CAST(NULL AS uuid) AS id, tracking_number, CAST(NULL AS text) AS carrier_code,
       CAST(NULL AS timestamptz) AS created_at, CAST(NULL AS text) AS status_code,
       CAST(NULL AS text) AS status_description,
       CAST(NULL AS timestamptz) AS estimated_delivery_date,
       CAST(NULL AS timestamptz) AS actual_delivery_date,
       CAST(NULL AS timestamptz) AS last_event_at, CAST(NULL AS integer) AS rearms,
       CAST(NULL AS boolean) AS rearm_due, CAST(NULL AS boolean) AS rearmable
FROM originals
UNION ALL
SELECT 'live', NULL, NULL, NULL, NULL, id, tracking_number, carrier_code, created_at,
       status_code, status_description, estimated_delivery_date, actual_delivery_date,
       last_event_at, rearms, rearm_due, rearmable
FROM live

-- part: insert_originals
-- One original per content (within the week: the index must hold the partition key): the
-- partial unique index, named by its predicate as ON CONFLICT requires. Each is stored filed
-- against the live subscription its package has now (read, not locked: repeats must not wait
-- on a row lock), or as an orphan; filing corrects the rare row whose subscription changed
-- before it was locked, so the common row is written once and never updated.
INSERT INTO webhook_deliveries ({delivery_columns}, subscription_id)
SELECT {delivery_values}, CASE WHEN live.id IS NULL THEN 'orphan' ELSE 'filed' END, live.id
FROM {delivery_rows}
LEFT JOIN LATERAL (
    SELECT s.id FROM subscriptions AS s
    WHERE s.tracking_number = v.tracking_number AND s.state <> 'stopped'
      AND (v.carrier_code IS NULL OR s.carrier_code = v.carrier_code)
    ORDER BY s.created_at DESC LIMIT 1
) AS live ON true
ORDER BY v.ord
ON CONFLICT (content_sha256, received_week) WHERE outcome IN ('filed', 'orphan') DO NOTHING
RETURNING id, content_sha256, outcome, subscription_id, tracking_number

-- part: delivery_rows
-- A delivery's row (`_delivery_parameters`) and its body, side by side, in the order given.
ROWS FROM (
    json_to_recordset(CAST(:deliveries AS json)) AS (
        headers jsonb, content_sha256 bytea, resource_type text, carrier_code text,
        tracking_number text, source text, verification text),
    unnest(CAST(:bodies AS bytea[]))
) WITH ORDINALITY AS v(headers, content_sha256, resource_type, carrier_code,
                       tracking_number, source, verification, body, ord)

-- part: delivery_columns
-- What a delivery's row is stored with (and its outcome, which each insert decides) ...
headers, body, body_sha256, content_sha256, resource_type, carrier_code, tracking_number,
source, verification, outcome

-- part: delivery_values
-- ... from `delivery_rows`.
v.headers, v.body, sha256(v.body), v.content_sha256, v.resource_type,
v.carrier_code, v.tracking_number, v.source, v.verification

-- part: live
-- What filing reads of a subscription (`_package_status`). Each statement that reads it takes
-- the lock filing needs on its rows, in id order (so that batches that share subscriptions
-- wait for each other instead of deadlocking), of the live ones: `state <> 'stopped'` is the
-- live-package index's predicate, so the index serves the lookup.
-- NO KEY UPDATE, the lock filing's UPDATE takes anyway: an original inserted by another batch
-- holds its subscription's row in KEY SHARE (the foreign key) until it commits, in the order of
-- its deliveries, and FOR UPDATE would wait on that while holding rows of its own: a deadlock
-- between two API processes given the same deliveries (tests/test_scale_out.py).
SELECT id, carrier_code, tracking_number, created_at, status_code, status_description,
       estimated_delivery_date, actual_delivery_date, last_event_at, rearms,
       next_attempt_at IS NOT NULL AS rearm_due,
       state = 'active' AND done_at IS NULL AS rearmable
FROM subscriptions

-- name: lock_live
-- The live subscriptions of these tracking numbers, locked (`live` says how).
{live}
WHERE tracking_number = ANY(CAST(:numbers AS text[])) AND state <> 'stopped'
ORDER BY id
FOR NO KEY UPDATE

-- name: orphans_of
-- The orphans of these tracking numbers, oldest first (`adopt_orphans`).
SELECT id, body, carrier_code, tracking_number
FROM webhook_deliveries
WHERE tracking_number = ANY(CAST(:numbers AS text[])) AND outcome = 'orphan'
ORDER BY id

-- name: mark
-- Stored deliveries whose outcome or subscription filing corrected.
WITH marks AS (
    SELECT * FROM json_to_recordset(CAST(:marks AS json))
        AS v(id bigint, outcome text, subscription_id uuid)
)
UPDATE webhook_deliveries AS d SET outcome = v.outcome, subscription_id = v.subscription_id
FROM marks AS v
WHERE d.id = ANY(ARRAY(SELECT id FROM marks)) AND d.id = v.id

-- name: write_filings
-- Everything a batch writes once its subscriptions are locked, in one statement (each round
-- trip cost the receiver more CPU than its rows did): the events the subscriptions lack, what
-- each shows now, its status history, its changes for the feed, and the copies, kept as
-- duplicates of what their originals were filed against: this week's original, the one their
-- insert ran into (an earlier week may hold another). The sub-statements touch different rows,
-- so seeing the same snapshot changes nothing; the copies' originals were inserted by an
-- earlier statement.
WITH shown AS (
    SELECT * FROM json_to_recordset(CAST(:statuses AS json)) AS v(
        id uuid, status_code text, status_description text,
        estimated_delivery_date timestamptz, actual_delivery_date timestamptz,
        last_event_at timestamptz, rearms integer, rearm_due boolean)
), new_events AS (
    INSERT INTO tracking_events
        (subscription_id, subscription_created_at, event_key, delivery_id,
         occurred_at, carrier_occurred_at, status_code, event_code, description,
         carrier_status_code, carrier_detail_code, status_detail_code, city_locality,
         state_province, postal_code, country_code, company_name, signer, latitude, longitude)
    SELECT * FROM json_to_recordset(CAST(:events AS json)) AS v(
        subscription_id uuid, subscription_created_at timestamptz, event_key bytea,
        delivery_id bigint, occurred_at timestamptz, carrier_occurred_at text,
        status_code text, event_code text, description text, carrier_status_code text,
        carrier_detail_code text, status_detail_code text, city_locality text,
        state_province text, postal_code text, country_code text, company_name text,
        signer text, latitude float8, longitude float8)
    ON CONFLICT (subscription_id, event_key, subscription_created_at) DO NOTHING
    RETURNING delivery_id
), candidates AS (
    -- A change each delivery may make (`_Candidate`), in the batch's order: of the type
    -- given, or, given none, `tracking.events_added` if the delivery stored new events.
    SELECT * FROM json_to_recordset(CAST(:candidates AS json)) AS v(
        ord integer, subscription_id uuid, delivery_id bigint, type text,
        previous_status_code text, status_code text, status_description text,
        estimated_delivery_date timestamptz, actual_delivery_date timestamptz,
        last_event_at timestamptz, newest_event jsonb)
), made AS (
    SELECT c.*, coalesce(c.type, 'tracking.events_added') AS made_type,
           row_number() OVER (PARTITION BY c.subscription_id ORDER BY c.ord) AS nth,
           count(*) OVER (PARTITION BY c.subscription_id) AS made
    FROM candidates AS c
    WHERE c.type IS NOT NULL
       OR c.delivery_id = ANY(ARRAY(SELECT delivery_id FROM new_events))
), statuses AS (
    UPDATE subscriptions AS s
    SET status_code = v.status_code,
        status_description = v.status_description,
        estimated_delivery_date = v.estimated_delivery_date,
        actual_delivery_date = v.actual_delivery_date,
        last_event_at = v.last_event_at,
        rearms = v.rearms,
        -- A restart of tracking after an EX: due after the delay.
        next_attempt_at = CASE
            WHEN v.rearm_due AND s.next_attempt_at IS NULL
            THEN now() + make_interval(secs => CAST(:rearm_delay_s AS float8))
            ELSE s.next_attempt_at END,
        last_heard_at = now(),
        updated_at = now(),
        change_sequence = s.change_sequence
            + coalesce((SELECT max(m.made) FROM made AS m WHERE m.subscription_id = s.id), 0)
    FROM shown AS v
    WHERE s.id = ANY(ARRAY(SELECT id FROM shown)) AND s.id = v.id
    RETURNING s.id, s.change_sequence, s.state, s.last_error
), history AS (
    INSERT INTO status_changes
        (subscription_id, previous_status_code, status_code, occurred_at, delivery_id)
    SELECT * FROM json_to_recordset(CAST(:history AS json)) AS v(
        subscription_id uuid, previous_status_code text, status_code text,
        occurred_at timestamptz, delivery_id bigint)
), feed AS (
    -- Each subscription's changes numbered on from its last, in the batch's order.
    INSERT INTO changes
        (type, subscription_id, sequence, state, status_code, status_description,
         estimated_delivery_date, actual_delivery_date, last_event_at, last_error,
         previous_status_code, newest_event)
    SELECT m.made_type, m.subscription_id, u.change_sequence - m.made + m.nth, u.state,
           m.status_code, m.status_description, m.estimated_delivery_date,
           m.actual_delivery_date, m.last_event_at, u.last_error, m.previous_status_code,
           m.newest_event
    FROM made AS m JOIN statuses AS u ON u.id = m.subscription_id
    ORDER BY m.ord
), copies AS (
    INSERT INTO webhook_deliveries ({delivery_columns}, subscription_id)
    SELECT {delivery_values}, 'duplicate',
           (SELECT o.subscription_id FROM webhook_deliveries AS o
            WHERE o.content_sha256 = v.content_sha256 AND o.outcome IN ('filed', 'orphan')
              AND o.received_week = (date_trunc('week', now() AT TIME ZONE 'UTC'))::date)
    FROM {delivery_rows} ORDER BY v.ord
    RETURNING id, subscription_id
)
SELECT 'event' AS kind, delivery_id AS id, CAST(NULL AS uuid) AS subscription_id,
       count(*) AS events
FROM new_events GROUP BY delivery_id
UNION ALL
SELECT 'copy', id, subscription_id, 0 FROM copies
