-- The change feed's statements (`service/db/changes.py`) but filing's, which makes its changes
-- in the statement that files (`write_filings`, `deliveries.sql`). Literals spell
-- `ChangeType`'s members; tests/test_named_sql.py holds them to it.

-- name: note
-- A change of each subscription named, of the type named, showing the subscription as it is
-- now (its row locked by the caller, or by this statement): one per subscription, its sequence
-- the next. A stale one also notes when its silence was reported, once per silence.
WITH notes AS (
    SELECT * FROM json_to_recordset(CAST(:notes AS json)) AS v(subscription_id uuid, type text)
), noted AS (
    UPDATE subscriptions AS s
    SET change_sequence = s.change_sequence + 1,
        stale_noted_at = CASE WHEN v.type = 'tracking.stale' THEN now()
                              ELSE s.stale_noted_at END
    FROM notes AS v
    WHERE s.id = ANY(ARRAY(SELECT subscription_id FROM notes)) AND s.id = v.subscription_id
    RETURNING s.id, s.change_sequence, s.state, s.status_code, s.status_description,
              s.estimated_delivery_date, s.actual_delivery_date, s.last_event_at, s.last_error,
              v.type
)
INSERT INTO changes
    (type, subscription_id, sequence, state, status_code, status_description,
     estimated_delivery_date, actual_delivery_date, last_event_at, last_error,
     previous_status_code, newest_event)
SELECT n.type, n.id, n.change_sequence, n.state, n.status_code, n.status_description,
       n.estimated_delivery_date, n.actual_delivery_date, n.last_event_at, n.last_error,
       n.status_code,
       -- The subscription's newest event (the timeline's index), as the feed shows an event.
       (SELECT to_jsonb(e) - ARRAY['id', 'subscription_id', 'subscription_created_at',
                                   'event_key', 'delivery_id', 'received_at']
        FROM tracking_events AS e
        WHERE e.subscription_id = n.id
        ORDER BY e.occurred_at DESC NULLS LAST, e.id DESC
        LIMIT 1)
FROM noted AS n
ORDER BY n.id
RETURNING id
