-- Sending notifications (`service/db/notify.py`): an endpoint's queue is filled from the change
-- feed (`enqueue`), its lanes claimed by workers (`claim`) and what each send did recorded
-- (`finish`, `drop_empty_lanes`). `:now` is the sender's clock, one for all of them.

-- name: enqueue
-- Messages queued for endpoints (a message already queued is left as it is: a replay of what is
-- still waiting queues nothing), each subscription's lane made or lengthened by what was
-- queued, and each endpoint's cursor moved past what it read.
WITH queued AS (
    INSERT INTO notify_messages (endpoint_id, change_id, subscription_id, sequence, type, body)
    SELECT v.endpoint_id, v.change_id, v.subscription_id, v.sequence, v.type, v.body
    FROM json_to_recordset(CAST(:messages AS json))
        AS v(endpoint_id uuid, change_id bigint, subscription_id uuid, sequence integer,
             type text, body bytea)
    ON CONFLICT DO NOTHING
    RETURNING endpoint_id, subscription_id
), lengthened AS (
    -- DO UPDATE, not DO NOTHING: it locks the lane, so a sender emptying it concurrently
    -- either sees the new messages counted or deletes it first (and this makes it anew).
    INSERT INTO notify_lanes AS l (endpoint_id, subscription_id, pending, next_attempt_at)
    SELECT endpoint_id, subscription_id, count(*), :now
    FROM queued
    GROUP BY endpoint_id, subscription_id
    ON CONFLICT (endpoint_id, subscription_id)
        DO UPDATE SET pending = l.pending + excluded.pending
), moved AS (
    UPDATE notify_cursors AS c
    SET txid = v.txid, change_id = v.change_id
    FROM json_to_recordset(CAST(:cursors AS json))
        AS v(endpoint_id uuid, txid bigint, change_id bigint)
    WHERE c.endpoint_id = v.endpoint_id
)
SELECT count(*) AS queued FROM queued

-- name: lock_endpoints
-- Endpoints that may send and have a lane due, up to `:endpoints` of them in random order (so
-- that none always comes last when slots are short), each locked for the transaction and skipped
-- while another worker's claim holds it: two workers never count one endpoint's room at once.
-- An advisory lock, not the row's: a record in progress holds the row (its attempts' foreign
-- key), and a claim must not pass the endpoint by for that, nor write to the row to lock it.
SELECT id
FROM (
    SELECT e.id
    FROM notify_endpoints AS e
    WHERE e.state = 'enabled'
      AND coalesce(e.paused_until, :now) <= :now
      AND coalesce(e.next_send_at, :now) < :now + make_interval(secs => :ahead_s)
      AND EXISTS (SELECT FROM notify_lanes AS l
                  WHERE l.endpoint_id = e.id AND l.next_attempt_at <= :now)
    ORDER BY random()
    LIMIT :endpoints
) AS candidate
WHERE pg_try_advisory_xact_lock(
    CAST(:lock_space AS bigint) << 32 | (hashtextextended(CAST(id AS text), 0) & 4294967295))

-- name: claim
-- Lanes of the endpoints `lock_endpoints` locked, due now, leased until `:lease_until`, each
-- with its oldest message (the one to send), its endpoint as the send needs it, and when it
-- may go. A statement after the lock, so its snapshot sees every claim committed before:
-- - an endpoint's room: `:per_endpoint` less its lanes in flight across every worker (claimed,
--   their lease running), not counting `:answered`, this worker's sends that were answered and
--   wait for their record; a rate-limited one's also no more than its pace sends within
--   `:ahead_s` of when it may next send;
-- - the slots handed out in turns (a lane of every endpoint with room, then a second...) until
--   `:slots` run out, and that many of each endpoint's due lanes claimed, oldest due first;
-- - a rate-limited endpoint's sends spaced at its pace from when it may next send, and that
--   moved past them, for whichever worker sends next.
WITH endpoint AS (
    SELECT e.id, e.url, e.secret, e.previous_secret, e.previous_secret_expires_at,
           e.rate_limit_per_s, greatest(coalesce(e.next_send_at, :now), :now) AS send_from
    FROM notify_endpoints AS e
    WHERE e.id = ANY (:endpoints)
      AND e.state = 'enabled'
      AND coalesce(e.paused_until, :now) <= :now
), roomy AS (
    SELECT e.*,
           1 / greatest(e.rate_limit_per_s, :rate_min) AS gap_s,
           least(
               :per_endpoint - (
                   SELECT count(*) FROM notify_lanes AS l
                   WHERE l.endpoint_id = e.id AND l.claim_token IS NOT NULL
                     AND l.next_attempt_at > :now AND l.claim_token <> ALL (:answered)),
               CASE WHEN e.rate_limit_per_s IS NULL THEN :per_endpoint
                    ELSE greatest(floor((:ahead_s - extract(epoch FROM e.send_from - :now))
                                        * greatest(e.rate_limit_per_s, :rate_min)), 1)
               END
           ) AS room
    FROM endpoint AS e
), quota AS (
    -- Each endpoint's share of the slots: its room, handed out one in every turn.
    SELECT id, count(*) AS lanes
    FROM (
        SELECT r.id, row_number() OVER (ORDER BY t.turn, r.place) AS handed
        FROM (SELECT id, room, random() AS place FROM roomy) AS r  -- its place in every turn
        CROSS JOIN LATERAL generate_series(1, CAST(r.room AS integer)) AS t(turn)
    ) AS h
    WHERE handed <= :slots
    GROUP BY id
), due AS (
    SELECT q.id AS endpoint_id, l.subscription_id, l.next_attempt_at
    FROM quota AS q
    CROSS JOIN LATERAL (
        SELECT subscription_id, next_attempt_at
        FROM notify_lanes
        WHERE endpoint_id = q.id AND next_attempt_at <= :now
        ORDER BY next_attempt_at
        LIMIT q.lanes
        FOR UPDATE SKIP LOCKED
    ) AS l
), picked AS (
    SELECT endpoint_id, subscription_id,
           row_number() OVER (PARTITION BY endpoint_id ORDER BY next_attempt_at) AS turn
    FROM due
), claimed AS (
    UPDATE notify_lanes AS l
    SET claim_token = gen_random_uuid(), next_attempt_at = :lease_until
    FROM picked AS p
    WHERE l.endpoint_id = p.endpoint_id AND l.subscription_id = p.subscription_id
    RETURNING l.endpoint_id, l.subscription_id, l.claim_token, l.failures, p.turn
), spaced AS (
    UPDATE notify_endpoints AS e
    SET next_send_at = r.send_from + make_interval(secs => c.sends * r.gap_s)
    FROM roomy AS r
    JOIN (SELECT endpoint_id, count(*) AS sends FROM claimed GROUP BY endpoint_id) AS c
      ON c.endpoint_id = r.id
    WHERE e.id = r.id AND r.rate_limit_per_s IS NOT NULL
    RETURNING 1
)
SELECT c.endpoint_id, c.subscription_id, c.claim_token, c.failures,
       r.url, r.secret, r.previous_secret, r.previous_secret_expires_at, r.rate_limit_per_s,
       CASE WHEN r.rate_limit_per_s IS NULL THEN :now
            ELSE r.send_from + make_interval(secs => (c.turn - 1) * r.gap_s)
       END AS send_at,
       m.change_id, m.type, m.body
FROM claimed AS c
JOIN roomy AS r ON r.id = c.endpoint_id
CROSS JOIN LATERAL (
    SELECT change_id, type, body
    FROM notify_messages
    WHERE endpoint_id = c.endpoint_id AND subscription_id = c.subscription_id
    ORDER BY sequence
    LIMIT 1
) AS m
ORDER BY c.endpoint_id, c.turn

-- name: release
-- Claimed lanes given back unsent (a worker stopping with sends claimed ahead), due now for any
-- worker; only those the claim still holds.
UPDATE notify_lanes AS l
SET claim_token = NULL, next_attempt_at = :now
FROM json_to_recordset(CAST(:lanes AS json))
    AS v(endpoint_id uuid, subscription_id uuid, claim_token uuid)
WHERE l.endpoint_id = v.endpoint_id AND l.subscription_id = v.subscription_id
  AND l.claim_token = v.claim_token

-- name: finish
-- What sends did. Only a send whose claim still holds its lane counts: one whose lease ran out
-- and whose lane was claimed again is left to the new claim, which sends the message again (at
-- least once), so a late answer never deletes a message, nor charges a failure, that is not
-- its own. Every attempt is kept (an endpoint deleted meanwhile keeps none); a delivered
-- message is deleted; its lane is released with its next attempt and failures, shortened by
-- what was deleted. The lanes are locked first, so no claim moves them meanwhile. (A
-- data-modifying WITH runs whether or not the statement reads it.)
WITH finished AS (
    SELECT * FROM json_to_recordset(CAST(:finished AS json))
        AS v(endpoint_id uuid, subscription_id uuid, claim_token uuid, change_id bigint,
             delivered boolean, failures integer, next_attempt_at timestamptz)
), holding AS (
    SELECT f.*
    FROM finished AS f
    JOIN notify_lanes AS l
      ON l.endpoint_id = f.endpoint_id AND l.subscription_id = f.subscription_id
     AND l.claim_token = f.claim_token
    FOR UPDATE OF l
), attempted AS (
    INSERT INTO notify_attempts
        (endpoint_id, message_id, subscription_id, type, attempt, outcome, status_code,
         latency_ms, response, attempted_at)
    SELECT v.endpoint_id, v.message_id, v.subscription_id, v.type, v.attempt, v.outcome,
           v.status_code, v.latency_ms, v.response, v.attempted_at
    FROM json_to_recordset(CAST(:attempts AS json))
        AS v(endpoint_id uuid, message_id text, subscription_id uuid, type text,
             attempt integer, outcome text, status_code integer, latency_ms double precision,
             response text, attempted_at timestamptz)
    WHERE EXISTS (SELECT FROM notify_endpoints AS e WHERE e.id = v.endpoint_id)
    RETURNING 1
), sent AS (
    DELETE FROM notify_messages AS m
    USING holding AS h
    WHERE h.delivered AND m.endpoint_id = h.endpoint_id AND m.change_id = h.change_id
    RETURNING m.endpoint_id, m.subscription_id
)
UPDATE notify_lanes AS l
SET pending = l.pending - (SELECT count(*) FROM sent AS s
                           WHERE s.endpoint_id = h.endpoint_id
                             AND s.subscription_id = h.subscription_id),
    failures = h.failures,
    next_attempt_at = h.next_attempt_at,
    claim_token = NULL
FROM holding AS h
WHERE l.endpoint_id = h.endpoint_id AND l.subscription_id = h.subscription_id
RETURNING l.endpoint_id, l.subscription_id, l.pending

-- name: drop_empty_lanes
-- Lanes with nothing left to send and nobody sending. The condition is checked again on the
-- row as it is when locked, so messages queued meanwhile keep their lane.
DELETE FROM notify_lanes AS l
USING json_to_recordset(CAST(:lanes AS json)) AS v(endpoint_id uuid, subscription_id uuid)
WHERE l.endpoint_id = v.endpoint_id AND l.subscription_id = v.subscription_id
  AND l.pending = 0 AND l.claim_token IS NULL
RETURNING 1
