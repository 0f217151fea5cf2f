"""The PostgreSQL schema, as versioned migrations, and applying them.

Every replica migrates at start and operators may run `agentlog migrate` before
a rollout: migrations run in one transaction under an advisory lock, so
replicas starting together apply each migration once, and the others wait and
find nothing left to do. A database migrated by a newer agentlog is refused
rather than written with an older understanding of it.
"""

from __future__ import annotations

from typing import Any

import psycopg

from agentlog.errors import FailedPreconditionError

# Taken for the length of a migration: any constant other programs are unlikely
# to pick ("agentlog" in ASCII).
MIGRATION_LOCK = 0x6167656E746C6F67

# Each migration once, in order; never edit one that has shipped, add another.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        r"""
-- One row: the feed's last position, which appends advance under this row's lock
-- (the serialised allocator that keeps the feed in commit order, without holes),
-- and the key that signs ListSessions page tokens, shared by every replica.
CREATE TABLE agentlog_meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_position bigint NOT NULL,
    page_key bytea NOT NULL
);
INSERT INTO agentlog_meta (last_position, page_key)
VALUES (0, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));

-- Every record. `event` is the event's JSON text exactly as the JSONL store
-- writes it (jsonb would reorder keys, drop duplicates and round numbers);
-- `parent_id` is bytea because a parent id may hold any character, NUL too;
-- timestamps are nanoseconds since the epoch (timestamptz holds microseconds).
CREATE TABLE agentlog_events (
    position bigint PRIMARY KEY,
    session_id text COLLATE "C" NOT NULL,
    sequence bigint NOT NULL,
    id text COLLATE "C" NOT NULL UNIQUE,
    parent_id bytea,
    timestamp_ns bigint NOT NULL,
    event bytea NOT NULL,
    UNIQUE (session_id, sequence)
);
CREATE INDEX agentlog_events_children ON agentlog_events (parent_id, session_id, sequence)
    WHERE parent_id IS NOT NULL;

-- One row per session, for ListSessions and for the append's checks.
CREATE TABLE agentlog_sessions (
    session_id text COLLATE "C" PRIMARY KEY,
    last_sequence bigint NOT NULL,
    first_timestamp_ns bigint NOT NULL,
    last_timestamp_ns bigint NOT NULL,
    head_id text NOT NULL
);

-- Appends, several at once (a replica's group commit), in one round trip.
-- Appends are decided in order; each is stored whole, or found to repeat ids
-- already stored (outcome 1: the caller tells a retry from a conflict), or
-- refused by its expectation (outcome 2). The lock on agentlog_meta is held to
-- the commit, so positions are given out in commit order and never skipped.
-- Session timestamps never go backwards, whichever replica's clock is behind
-- (unless kept from another store by `agentlog copy`: p_kept_ns).
-- Per append: p_sessions, p_expected, p_counts, p_kept_ns. Per event: p_append_of
-- (its append's number, from 1), p_ids, p_parents, p_events. No id may repeat
-- within one call (the caller splits groups there).
-- The events are inserted in one statement at the end: indexing the event
-- arrays inside the loop would copy them for every append.
CREATE FUNCTION agentlog_append(
    p_sessions text[], p_expected bigint[], p_counts integer[], p_kept_ns bigint[],
    p_append_of integer[], p_ids text[], p_parents bytea[], p_events bytea[], p_now_ns bigint
) RETURNS TABLE (outcome smallint, first_sequence bigint, first_position bigint, stored_ns bigint)
-- Its plans are made once per connection, often while the tables are still
-- small: keep them on the indexes, which stay right at any size (and without
-- JIT, which the cost of a refused sequential scan would otherwise set off).
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    v_position bigint;
    v_known integer[];
    v_count integer;
    v_last bigint;
    v_last_ns bigint;
    v_ns bigint;
    v_session text;
    v_heads text[];
    v_stored integer[] := '{}';
    v_first_positions bigint[] := '{}';
    v_first_sequences bigint[] := '{}';
    v_timestamps bigint[] := '{}';
BEGIN
    SELECT m.last_position INTO v_position FROM agentlog_meta m WHERE m.singleton FOR UPDATE;
    -- Which appends name an id already stored, in one look at the id index.
    SELECT coalesce(array_agg(DISTINCT u.a), '{}') INTO v_known
        FROM unnest(p_append_of, p_ids) AS u(a, id)
        WHERE u.id = ANY (ARRAY(SELECT e.id FROM agentlog_events e WHERE e.id = ANY (p_ids)));
    -- Each append's last id: the session's new head.
    SELECT array_agg(u.id ORDER BY u.a) INTO v_heads FROM (
        SELECT DISTINCT ON (a) a, id FROM unnest(p_append_of, p_ids) WITH ORDINALITY AS x(a, id, k)
        ORDER BY a, k DESC) AS u;
    FOR i IN 1 .. coalesce(array_length(p_sessions, 1), 0) LOOP
        v_session := p_sessions[i];
        v_count := p_counts[i];
        SELECT s.last_sequence, s.last_timestamp_ns INTO v_last, v_last_ns
            FROM agentlog_sessions s WHERE s.session_id = v_session;
        IF NOT FOUND THEN
            v_last := 0;
            v_last_ns := 0;
        END IF;
        IF i = ANY (v_known) THEN
            outcome := 1; first_sequence := v_last; first_position := 0; stored_ns := 0;
        ELSIF p_expected[i] IS NOT NULL AND p_expected[i] <> v_last THEN
            outcome := 2; first_sequence := v_last; first_position := 0; stored_ns := 0;
        ELSE
            v_ns := coalesce(p_kept_ns[i], greatest(p_now_ns, v_last_ns));
            v_stored := v_stored || i;
            v_first_positions := v_first_positions || (v_position + 1);
            v_first_sequences := v_first_sequences || (v_last + 1);
            v_timestamps := v_timestamps || v_ns;
            INSERT INTO agentlog_sessions AS s
                (session_id, last_sequence, first_timestamp_ns, last_timestamp_ns, head_id)
            VALUES (v_session, v_last + v_count, v_ns, v_ns, v_heads[i])
            ON CONFLICT (session_id) DO UPDATE SET
                last_sequence = excluded.last_sequence,
                last_timestamp_ns = excluded.last_timestamp_ns,
                head_id = excluded.head_id;
            PERFORM pg_notify('agentlog_feed', concat_ws(' ', v_position + 1, v_position + v_count,
                                                         v_last + v_count, v_session));
            outcome := 0; first_sequence := v_last + 1; first_position := v_position + 1;
            stored_ns := v_ns;
            v_position := v_position + v_count;
        END IF;
        RETURN NEXT;
    END LOOP;
    INSERT INTO agentlog_events (position, session_id, sequence, id, parent_id,
                                 timestamp_ns, event)
    SELECT d.first_position + (u.k - f.k), p_sessions[d.a], d.first_sequence + (u.k - f.k),
           u.id, u.parent, d.ns, u.event
    FROM unnest(v_stored, v_first_positions, v_first_sequences, v_timestamps)
             AS d(a, first_position, first_sequence, ns)
    JOIN (SELECT x.a, min(x.k) AS k FROM unnest(p_append_of) WITH ORDINALITY AS x(a, k)
          GROUP BY x.a) AS f ON f.a = d.a
    JOIN unnest(p_append_of, p_ids, p_parents, p_events)
             WITH ORDINALITY AS u(a, id, parent, event, k) ON u.a = d.a;
    UPDATE agentlog_meta SET last_position = v_position WHERE singleton;
END
$$;
""",
    ),
    (
        2,
        r"""
-- Branches: every record belongs to a branch of its session ("main" unless named),
-- and sequences are counted per branch.
ALTER TABLE agentlog_events ADD COLUMN branch_id text COLLATE "C" NOT NULL DEFAULT 'main';
ALTER TABLE agentlog_events DROP CONSTRAINT agentlog_events_session_id_sequence_key;
ALTER TABLE agentlog_events ADD CONSTRAINT agentlog_events_branch_sequence
    UNIQUE (session_id, branch_id, sequence);
DROP INDEX agentlog_events_children;
CREATE INDEX agentlog_events_children
    ON agentlog_events (parent_id, session_id, branch_id, sequence) WHERE parent_id IS NOT NULL;

-- One row per branch, for ListSessions and for the append's checks; where a forked
-- branch came from.
CREATE TABLE agentlog_branches (
    session_id text COLLATE "C" NOT NULL,
    branch_id text COLLATE "C" NOT NULL,
    last_sequence bigint NOT NULL,
    first_timestamp_ns bigint NOT NULL,
    last_timestamp_ns bigint NOT NULL,
    head_id text NOT NULL,
    forked_from_session text COLLATE "C",
    forked_from_branch text COLLATE "C",
    forked_from_sequence bigint,
    PRIMARY KEY (session_id, branch_id)
);
INSERT INTO agentlog_branches
    (session_id, branch_id, last_sequence, first_timestamp_ns, last_timestamp_ns, head_id)
SELECT session_id, 'main', last_sequence, first_timestamp_ns, last_timestamp_ns, head_id
FROM agentlog_sessions;
DROP TABLE agentlog_sessions;

-- As in version 1, with each append's branch (p_branches) beside its session. The
-- notification names the branch too: "first last last_sequence branch_length
-- branch||session" (ids may hold spaces; the length says where the branch ends).
DROP FUNCTION agentlog_append(text[], bigint[], integer[], bigint[], integer[], text[],
                              bytea[], bytea[], bigint);
CREATE FUNCTION agentlog_append(
    p_sessions text[], p_branches text[], p_expected bigint[], p_counts integer[],
    p_kept_ns bigint[], p_append_of integer[], p_ids text[], p_parents bytea[],
    p_events bytea[], p_now_ns bigint
) RETURNS TABLE (outcome smallint, first_sequence bigint, first_position bigint, stored_ns bigint)
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    v_position bigint;
    v_known integer[];
    v_count integer;
    v_last bigint;
    v_last_ns bigint;
    v_ns bigint;
    v_session text;
    v_branch text;
    v_heads text[];
    v_stored integer[] := '{}';
    v_first_positions bigint[] := '{}';
    v_first_sequences bigint[] := '{}';
    v_timestamps bigint[] := '{}';
BEGIN
    SELECT m.last_position INTO v_position FROM agentlog_meta m WHERE m.singleton FOR UPDATE;
    SELECT coalesce(array_agg(DISTINCT u.a), '{}') INTO v_known
        FROM unnest(p_append_of, p_ids) AS u(a, id)
        WHERE u.id = ANY (ARRAY(SELECT e.id FROM agentlog_events e WHERE e.id = ANY (p_ids)));
    SELECT array_agg(u.id ORDER BY u.a) INTO v_heads FROM (
        SELECT DISTINCT ON (a) a, id FROM unnest(p_append_of, p_ids) WITH ORDINALITY AS x(a, id, k)
        ORDER BY a, k DESC) AS u;
    FOR i IN 1 .. coalesce(array_length(p_sessions, 1), 0) LOOP
        v_session := p_sessions[i];
        v_branch := p_branches[i];
        v_count := p_counts[i];
        SELECT b.last_sequence, b.last_timestamp_ns INTO v_last, v_last_ns
            FROM agentlog_branches b WHERE b.session_id = v_session AND b.branch_id = v_branch;
        IF NOT FOUND THEN
            v_last := 0;
            v_last_ns := 0;
        END IF;
        IF i = ANY (v_known) THEN
            outcome := 1; first_sequence := v_last; first_position := 0; stored_ns := 0;
        ELSIF p_expected[i] IS NOT NULL AND p_expected[i] <> v_last THEN
            outcome := 2; first_sequence := v_last; first_position := 0; stored_ns := 0;
        ELSE
            v_ns := coalesce(p_kept_ns[i], greatest(p_now_ns, v_last_ns));
            v_stored := v_stored || i;
            v_first_positions := v_first_positions || (v_position + 1);
            v_first_sequences := v_first_sequences || (v_last + 1);
            v_timestamps := v_timestamps || v_ns;
            INSERT INTO agentlog_branches AS b (session_id, branch_id, last_sequence,
                                                first_timestamp_ns, last_timestamp_ns, head_id)
            VALUES (v_session, v_branch, v_last + v_count, v_ns, v_ns, v_heads[i])
            ON CONFLICT (session_id, branch_id) DO UPDATE SET
                last_sequence = excluded.last_sequence,
                last_timestamp_ns = excluded.last_timestamp_ns,
                head_id = excluded.head_id;
            PERFORM pg_notify('agentlog_feed', concat_ws(' ', v_position + 1, v_position + v_count,
                                                         v_last + v_count, length(v_branch),
                                                         v_branch || v_session));
            outcome := 0; first_sequence := v_last + 1; first_position := v_position + 1;
            stored_ns := v_ns;
            v_position := v_position + v_count;
        END IF;
        RETURN NEXT;
    END LOOP;
    INSERT INTO agentlog_events (position, session_id, branch_id, sequence, id, parent_id,
                                 timestamp_ns, event)
    SELECT d.first_position + (u.k - f.k), p_sessions[d.a], p_branches[d.a],
           d.first_sequence + (u.k - f.k), u.id, u.parent, d.ns, u.event
    FROM unnest(v_stored, v_first_positions, v_first_sequences, v_timestamps)
             AS d(a, first_position, first_sequence, ns)
    JOIN (SELECT x.a, min(x.k) AS k FROM unnest(p_append_of) WITH ORDINALITY AS x(a, k)
          GROUP BY x.a) AS f ON f.a = d.a
    JOIN unnest(p_append_of, p_ids, p_parents, p_events)
             WITH ORDINALITY AS u(a, id, parent, event, k) ON u.a = d.a;
    UPDATE agentlog_meta SET last_position = v_position WHERE singleton;
END
$$;

-- Forks' copies hold no feed position of their own: their rows take negative
-- numbers from this sequence (the column is unique), and their feed positions are a
-- range, first_position + sequence - 1, recorded at the fork's commit.
CREATE SEQUENCE agentlog_fork_rows CACHE 1024;
CREATE TABLE agentlog_fork_ranges (
    first_position bigint PRIMARY KEY,
    last_position bigint NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    branch_id text COLLATE "C" NOT NULL
);
CREATE INDEX agentlog_fork_ranges_last ON agentlog_fork_ranges (last_position);

-- A fork: records 1..p_up_to of a branch copied into a new branch, with new ids
-- (random version 4 UUIDs) and parents inside the copied records re-pointed to the
-- copies. The rows are inserted first, outside the feed's counter lock (appends go
-- on meanwhile; nobody sees them before the commit); then, under the lock, the new
-- branch is claimed and given its range of positions, so the feed still grows in
-- commit order. Outcomes: 0 made, 1 the source lacks p_up_to (last_sequence says
-- where it ends), 2 p_expected does not hold, 3 the new branch exists. A branch
-- made meanwhile by an append or another fork raises SQLSTATE AG001 (all undone).
CREATE FUNCTION agentlog_fork(
    p_session text, p_branch text, p_up_to bigint, p_expected bigint,
    p_new_session text, p_new_branch text
) RETURNS TABLE (outcome smallint, last_sequence bigint, first_position bigint,
                 first_ns bigint, last_ns bigint, head_id text)
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    v_last bigint;
    v_position bigint;
    v_first_ns bigint;
    v_last_ns bigint;
    v_head text;
BEGIN
    SELECT b.last_sequence INTO v_last FROM agentlog_branches b
        WHERE b.session_id = p_session AND b.branch_id = p_branch;
    v_last := coalesce(v_last, 0);
    IF p_expected IS NOT NULL AND p_expected <> v_last THEN
        RETURN QUERY SELECT 2::smallint, v_last, 0::bigint, 0::bigint, 0::bigint, ''::text;
        RETURN;
    END IF;
    IF v_last < p_up_to THEN
        RETURN QUERY SELECT 1::smallint, v_last, 0::bigint, 0::bigint, 0::bigint, ''::text;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM agentlog_branches b
               WHERE b.session_id = p_new_session AND b.branch_id = p_new_branch) THEN
        RETURN QUERY SELECT 3::smallint, v_last, 0::bigint, 0::bigint, 0::bigint, ''::text;
        RETURN;
    END IF;
    CREATE TEMP TABLE agentlog_fork_ids ON COMMIT DROP AS
        SELECT convert_to(e.id, 'UTF8') AS old_id, gen_random_uuid()::text AS new_id
        FROM agentlog_events e
        WHERE e.session_id = p_session AND e.branch_id = p_branch AND e.sequence <= p_up_to;
    INSERT INTO agentlog_events (position, session_id, branch_id, sequence, id, parent_id,
                                 timestamp_ns, event)
    SELECT -nextval('agentlog_fork_rows'), p_new_session, p_new_branch, e.sequence, m.new_id,
           coalesce(convert_to(pm.new_id, 'UTF8'), e.parent_id), e.timestamp_ns, e.event
    FROM agentlog_events e
    JOIN agentlog_fork_ids m ON m.old_id = convert_to(e.id, 'UTF8')
    LEFT JOIN agentlog_fork_ids pm ON pm.old_id = e.parent_id
    WHERE e.session_id = p_session AND e.branch_id = p_branch AND e.sequence <= p_up_to;
    SELECT e.timestamp_ns INTO v_first_ns FROM agentlog_events e
        WHERE e.session_id = p_new_session AND e.branch_id = p_new_branch AND e.sequence = 1;
    SELECT e.timestamp_ns, e.id INTO v_last_ns, v_head FROM agentlog_events e
        WHERE e.session_id = p_new_session AND e.branch_id = p_new_branch
          AND e.sequence = p_up_to;
    SELECT m.last_position INTO v_position FROM agentlog_meta m WHERE m.singleton FOR UPDATE;
    INSERT INTO agentlog_branches (session_id, branch_id, last_sequence, first_timestamp_ns,
                                   last_timestamp_ns, head_id, forked_from_session,
                                   forked_from_branch, forked_from_sequence)
    VALUES (p_new_session, p_new_branch, p_up_to, v_first_ns, v_last_ns, v_head,
            p_session, p_branch, p_up_to)
    ON CONFLICT (session_id, branch_id) DO NOTHING;
    IF NOT FOUND THEN  -- made meanwhile: undo every row
        RAISE EXCEPTION 'the new branch was made meanwhile' USING ERRCODE = 'AG001';
    END IF;
    INSERT INTO agentlog_fork_ranges
    VALUES (v_position + 1, v_position + p_up_to, p_new_session, p_new_branch);
    UPDATE agentlog_meta SET last_position = v_position + p_up_to WHERE singleton;
    PERFORM pg_notify('agentlog_feed', concat_ws(' ', v_position + 1, v_position + p_up_to,
                                                 p_up_to, length(p_new_branch),
                                                 p_new_branch || p_new_session));
    RETURN QUERY SELECT 0::smallint, p_up_to, v_position + 1, v_first_ns, v_last_ns, v_head;
END
$$;
""",
    ),
    (
        3,
        r"""
-- Labels: each session's, with their version; and one row per (key, value) for
-- finding sessions by a label in id order with one index range scan.
CREATE TABLE agentlog_labels (
    session_id text COLLATE "C" PRIMARY KEY,
    version bigint NOT NULL,
    labels jsonb NOT NULL
);
CREATE TABLE agentlog_label_pairs (
    key text COLLATE "C" NOT NULL,
    value text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (key, value, session_id)
);
CREATE INDEX agentlog_label_pairs_session ON agentlog_label_pairs (session_id);

-- The ids of deleted records, as SHA-256 digests: never used again (an old append
-- retried after a delete is refused rather than stored).
CREATE TABLE agentlog_erased (digest bytea PRIMARY KEY);

-- Deletion markers: each takes a feed position of its own.
CREATE TABLE agentlog_deletions (
    position bigint PRIMARY KEY,
    session_id text COLLATE "C" NOT NULL,
    branch_id text COLLATE "C" NOT NULL,
    last_sequence bigint NOT NULL,
    deleted_ns bigint NOT NULL
);

-- Retention looks for branches by the time of their last record.
CREATE INDEX agentlog_branches_last_ns ON agentlog_branches (last_timestamp_ns);

-- As in version 2, and an append that reuses a deleted record's id is refused
-- (outcome 3).
DROP FUNCTION agentlog_append(text[], text[], bigint[], integer[], bigint[], integer[],
                              text[], bytea[], bytea[], bigint);
CREATE FUNCTION agentlog_append(
    p_sessions text[], p_branches text[], p_expected bigint[], p_counts integer[],
    p_kept_ns bigint[], p_append_of integer[], p_ids text[], p_parents bytea[],
    p_events bytea[], p_now_ns bigint
) RETURNS TABLE (outcome smallint, first_sequence bigint, first_position bigint, stored_ns bigint)
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    v_position bigint;
    v_known integer[];
    v_erased integer[];
    v_count integer;
    v_last bigint;
    v_last_ns bigint;
    v_ns bigint;
    v_session text;
    v_branch text;
    v_heads text[];
    v_stored integer[] := '{}';
    v_first_positions bigint[] := '{}';
    v_first_sequences bigint[] := '{}';
    v_timestamps bigint[] := '{}';
BEGIN
    SELECT m.last_position INTO v_position FROM agentlog_meta m WHERE m.singleton FOR UPDATE;
    SELECT coalesce(array_agg(DISTINCT u.a), '{}') INTO v_known
        FROM unnest(p_append_of, p_ids) AS u(a, id)
        WHERE u.id = ANY (ARRAY(SELECT e.id FROM agentlog_events e WHERE e.id = ANY (p_ids)));
    SELECT coalesce(array_agg(DISTINCT u.a), '{}') INTO v_erased
        FROM unnest(p_append_of, p_ids) AS u(a, id)
        WHERE sha256(convert_to(u.id, 'UTF8')) = ANY (ARRAY(
            SELECT r.digest FROM agentlog_erased r
            WHERE r.digest = ANY (ARRAY(SELECT sha256(convert_to(x, 'UTF8'))
                                        FROM unnest(p_ids) AS x))));
    SELECT array_agg(u.id ORDER BY u.a) INTO v_heads FROM (
        SELECT DISTINCT ON (a) a, id FROM unnest(p_append_of, p_ids) WITH ORDINALITY AS x(a, id, k)
        ORDER BY a, k DESC) AS u;
    FOR i IN 1 .. coalesce(array_length(p_sessions, 1), 0) LOOP
        v_session := p_sessions[i];
        v_branch := p_branches[i];
        v_count := p_counts[i];
        SELECT b.last_sequence, b.last_timestamp_ns INTO v_last, v_last_ns
            FROM agentlog_branches b WHERE b.session_id = v_session AND b.branch_id = v_branch;
        IF NOT FOUND THEN
            v_last := 0;
            v_last_ns := 0;
        END IF;
        IF i = ANY (v_known) THEN
            outcome := 1; first_sequence := v_last; first_position := 0; stored_ns := 0;
        ELSIF i = ANY (v_erased) THEN
            outcome := 3; first_sequence := v_last; first_position := 0; stored_ns := 0;
        ELSIF p_expected[i] IS NOT NULL AND p_expected[i] <> v_last THEN
            outcome := 2; first_sequence := v_last; first_position := 0; stored_ns := 0;
        ELSE
            v_ns := coalesce(p_kept_ns[i], greatest(p_now_ns, v_last_ns));
            v_stored := v_stored || i;
            v_first_positions := v_first_positions || (v_position + 1);
            v_first_sequences := v_first_sequences || (v_last + 1);
            v_timestamps := v_timestamps || v_ns;
            INSERT INTO agentlog_branches AS b (session_id, branch_id, last_sequence,
                                                first_timestamp_ns, last_timestamp_ns, head_id)
            VALUES (v_session, v_branch, v_last + v_count, v_ns, v_ns, v_heads[i])
            ON CONFLICT (session_id, branch_id) DO UPDATE SET
                last_sequence = excluded.last_sequence,
                last_timestamp_ns = excluded.last_timestamp_ns,
                head_id = excluded.head_id;
            PERFORM pg_notify('agentlog_feed', concat_ws(' ', v_position + 1, v_position + v_count,
                                                         v_last + v_count, length(v_branch),
                                                         v_branch || v_session));
            outcome := 0; first_sequence := v_last + 1; first_position := v_position + 1;
            stored_ns := v_ns;
            v_position := v_position + v_count;
        END IF;
        RETURN NEXT;
    END LOOP;
    INSERT INTO agentlog_events (position, session_id, branch_id, sequence, id, parent_id,
                                 timestamp_ns, event)
    SELECT d.first_position + (u.k - f.k), p_sessions[d.a], p_branches[d.a],
           d.first_sequence + (u.k - f.k), u.id, u.parent, d.ns, u.event
    FROM unnest(v_stored, v_first_positions, v_first_sequences, v_timestamps)
             AS d(a, first_position, first_sequence, ns)
    JOIN (SELECT x.a, min(x.k) AS k FROM unnest(p_append_of) WITH ORDINALITY AS x(a, k)
          GROUP BY x.a) AS f ON f.a = d.a
    JOIN unnest(p_append_of, p_ids, p_parents, p_events)
             WITH ORDINALITY AS u(a, id, parent, event, k) ON u.a = d.a;
    UPDATE agentlog_meta SET last_position = v_position WHERE singleton;
END
$$;

-- A delete of one branch (p_branch) or of every branch (p_branch NULL) of a session.
-- Each branch's row is locked, its ids reserved and its records (and fork ranges)
-- deleted; then, under the feed's counter lock (held briefly, at the end, so appends
-- elsewhere go on meanwhile), each gets a marker at a new position. Labels go with
-- the last branch. Outcomes: 0 deleted (one row per branch), 1 nothing to delete,
-- 2 p_expected does not hold (last_sequence says what it is).
CREATE FUNCTION agentlog_delete(
    p_session text, p_branch text, p_expected bigint, p_now_ns bigint
) RETURNS TABLE (outcome smallint, deleted_branch text, deleted_last bigint, marker bigint)
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    v_branches text[];
    v_lasts bigint[];
    v_position bigint;
BEGIN
    SELECT array_agg(b.branch_id ORDER BY b.branch_id),
           array_agg(b.last_sequence ORDER BY b.branch_id)
        INTO v_branches, v_lasts
        FROM (SELECT b.branch_id, b.last_sequence FROM agentlog_branches b
              WHERE b.session_id = p_session AND (p_branch IS NULL OR b.branch_id = p_branch)
              ORDER BY b.branch_id FOR UPDATE) AS b;
    IF v_branches IS NULL THEN
        RETURN QUERY SELECT 1::smallint, p_branch, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF p_expected IS NOT NULL AND p_expected <> v_lasts[1] THEN
        RETURN QUERY SELECT 2::smallint, v_branches[1], v_lasts[1], 0::bigint;
        RETURN;
    END IF;
    INSERT INTO agentlog_erased
        SELECT sha256(convert_to(e.id, 'UTF8')) FROM agentlog_events e
        WHERE e.session_id = p_session AND e.branch_id = ANY (v_branches)
        ON CONFLICT DO NOTHING;
    DELETE FROM agentlog_events e
        WHERE e.session_id = p_session AND e.branch_id = ANY (v_branches);
    DELETE FROM agentlog_fork_ranges f
        WHERE f.session_id = p_session AND f.branch_id = ANY (v_branches);
    DELETE FROM agentlog_branches b
        WHERE b.session_id = p_session AND b.branch_id = ANY (v_branches);
    IF NOT EXISTS (SELECT 1 FROM agentlog_branches b WHERE b.session_id = p_session) THEN
        DELETE FROM agentlog_labels l WHERE l.session_id = p_session;
        DELETE FROM agentlog_label_pairs l WHERE l.session_id = p_session;
    END IF;
    SELECT m.last_position INTO v_position FROM agentlog_meta m WHERE m.singleton FOR UPDATE;
    FOR i IN 1 .. array_length(v_branches, 1) LOOP
        v_position := v_position + 1;
        INSERT INTO agentlog_deletions
        VALUES (v_position, p_session, v_branches[i], v_lasts[i], p_now_ns);
        -- A deletion's notification: sequence 0.
        PERFORM pg_notify('agentlog_feed', concat_ws(' ', v_position, v_position, 0,
                                                     length(v_branches[i]),
                                                     v_branches[i] || p_session));
        RETURN QUERY SELECT 0::smallint, v_branches[i], v_lasts[i], v_position;
    END LOOP;
    UPDATE agentlog_meta SET last_position = v_position WHERE singleton;
END
$$;
""",
    ),
]
LATEST = MIGRATIONS[-1][0]


async def migrate(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> tuple[int, int]:
    """Bring the schema up to date; (version before, version after). `conn` must be
    in autocommit mode (the migration makes its own transaction)."""
    encoding = await (await conn.execute("SHOW server_encoding")).fetchone()
    if encoding is None or str(encoding[0]).upper() not in ("UTF8", "UTF-8"):
        raise FailedPreconditionError(
            f"the database's encoding is {encoding[0] if encoding else '?'}, not UTF8: session "
            "ids are ordered by their UTF-8 bytes; create the database with ENCODING 'UTF8'",
            reason="DATABASE_ENCODING",
        )
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS agentlog_schema ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = await (
            await conn.execute("SELECT coalesce(max(version), 0) FROM agentlog_schema")
        ).fetchone()
        before = int(row[0]) if row else 0
        if before > LATEST:
            raise FailedPreconditionError(
                f"the database's agentlog schema is version {before}, newer than this "
                f"agentlog understands (up to {LATEST}); run a newer agentlog",
                reason="SCHEMA_TOO_NEW",
            )
        for version, sql in MIGRATIONS:
            if version > before:
                await conn.execute(sql.encode())
                await conn.execute("INSERT INTO agentlog_schema (version) VALUES (%s)", (version,))
    return before, LATEST
