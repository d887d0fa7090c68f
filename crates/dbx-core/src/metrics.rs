//! The name of every metric the daemon exports, in one place, so that a rename is
//! one edit and `deploy/` dashboards and alerts can be checked against this list.
//!
//! Prometheus conventions: `dbx_` prefix, base units, `_total` for counters, label
//! sets bounded to `reason`, `transport`, `trigger`, `kind`, `org`, and for the control
//! plane's gauges `schema` (live | archive) and `table` (the dbx tables, partitions
//! summed). The HELP text of each is registered by [`describe`] callers in the binary
//! (via `metrics::describe_*`).

/// Listener: open connections (gauge, label `transport`).
pub const CONNECTIONS_OPEN: &str = "dbx_connections_open";
/// Listener: connections accepted (counter, label `transport`).
pub const CONNECTIONS_TOTAL: &str = "dbx_connections_total";
/// Listener: connections refused before their handshake (counter, label `reason` =
/// max_connections | max_pending_handshakes | max_pending_per_ip).
pub const CONNECTIONS_REFUSED_TOTAL: &str = "dbx_connections_refused_total";
/// Listener: connections accepted that have not completed their handshake (TLS and
/// `hello`) yet (gauge).
pub const PENDING_HANDSHAKES: &str = "dbx_pending_handshakes";
/// Listener: connections closed because their peer did not read what the server wrote
/// within `write_timeout_ms` (counter, label `transport`).
pub const WRITE_TIMEOUTS_TOTAL: &str = "dbx_write_timeouts_total";
/// Listener: bytes of frames and decoded batches charged against `limits.max_buffered_bytes`
/// right now (gauge).
pub const BUFFERED_BYTES: &str = "dbx_buffered_bytes";
/// Listener: `limits.max_buffered_bytes` (gauge).
pub const BUFFERED_BYTES_LIMIT: &str = "dbx_buffered_bytes_limit";
/// Listener: times a TCP connection stopped reading because the byte budget was spent
/// (counter, label `transport`).
pub const BUFFERED_BYTES_WAITS_TOTAL: &str = "dbx_buffered_bytes_waits_total";
/// Listener: frames received (counter, label `transport`).
pub const FRAMES_RECEIVED_TOTAL: &str = "dbx_frames_received_total";
/// Listener: points received and accepted into the pipeline (counter, label `transport`).
pub const POINTS_RECEIVED_TOTAL: &str = "dbx_points_received_total";
/// Listener: batches or connections rejected (counter, label `reason` = protocol code).
pub const REJECTIONS_TOTAL: &str = "dbx_rejections_total";
/// Listener: failed handshakes (counter, label `reason`).
pub const AUTH_FAILURES_TOTAL: &str = "dbx_auth_failures_total";
/// Listener: each pause of TCP reads by the per-organization rate limit (histogram, seconds;
/// its `_sum` is the total time paused, its `_count` the number of pauses).
pub const RATE_LIMIT_WAIT_SECONDS: &str = "dbx_rate_limit_wait_seconds";
/// Listener: UDP points dropped over the rate limit (counter).
pub const RATE_LIMIT_DROPS_TOTAL: &str = "dbx_rate_limit_dropped_points_total";
/// Listener: UDP datagrams dropped (counter, label `reason`).
pub const UDP_DROPPED_TOTAL: &str = "dbx_udp_dropped_total";
/// Listener: frame received → ack sent (histogram, seconds).
pub const ACK_LATENCY_SECONDS: &str = "dbx_ack_latency_seconds";
/// Listener: reloads of the key and aircraft cache that succeeded (counter).
pub const AUTH_RELOADS_TOTAL: &str = "dbx_auth_reloads_total";
/// Listener: failures of the task keeping that cache fresh (lost LISTEN connection, failed
/// reload; it retries with backoff, the previous snapshot stays in force) (counter).
pub const AUTH_REFRESH_FAILURES_TOTAL: &str = "dbx_auth_refresh_failures_total";
/// Listener: when the cache was last reloaded successfully (gauge, unix seconds; alert when it
/// falls behind, as revocations and new aircraft then do not take effect).
pub const AUTH_LAST_RELOAD_TIMESTAMP_SECONDS: &str = "dbx_auth_last_reload_timestamp_seconds";
/// Listener: API keys the cache accepts (gauge).
pub const AUTH_KEYS: &str = "dbx_auth_keys";
/// Listener: active aircraft the cache knows (gauge).
pub const AUTH_AIRCRAFT: &str = "dbx_auth_aircraft";

/// Per organization (label `org` = its org code; past `metrics.max_org_labels`
/// organizations, `other`): points accepted into the pipeline, all inputs (counter).
pub const ORG_POINTS_RECEIVED_TOTAL: &str = "dbx_org_points_received_total";
/// Per organization: batches accepted into the pipeline (counter, label `org`).
pub const ORG_BATCHES_RECEIVED_TOTAL: &str = "dbx_org_batches_received_total";
/// Per organization: bytes received from its gateways — frames, datagrams, MQTT payloads —
/// whatever became of them (counter, label `org`).
pub const ORG_RECEIVED_BYTES_TOTAL: &str = "dbx_org_received_bytes_total";
/// Per organization: batches refused — nacked, or datagrams dropped for a reason of its own
/// (counter, label `org`).
pub const ORG_REJECTIONS_TOTAL: &str = "dbx_org_rejections_total";
/// Per organization: each pause of its input for its rate limit (histogram, seconds, label
/// `org`, two buckets; its `_sum` is the time paused).
pub const ORG_RATE_LIMIT_WAIT_SECONDS: &str = "dbx_org_rate_limit_wait_seconds";
/// Organizations with a label of their own in the per-organization metrics (gauge; at
/// `metrics.max_org_labels` further ones count under `other`).
pub const ORG_LABELS: &str = "dbx_org_labels";

/// MQTT input: messages received from the broker (counter, label `kind` = qos0 | qos1).
pub const MQTT_MESSAGES_RECEIVED_TOTAL: &str = "dbx_mqtt_messages_received_total";
/// MQTT input: QoS 1 messages acknowledged (PUBACK sent after the batcher's verdict) (counter).
pub const MQTT_MESSAGES_ACKED_TOTAL: &str = "dbx_mqtt_messages_acked_total";
/// MQTT input: messages rejected, by the decoder or the batcher (counter, label `reason` =
/// protocol code).
pub const MQTT_MESSAGES_REJECTED_TOTAL: &str = "dbx_mqtt_messages_rejected_total";
/// MQTT input: rejection notices published to the dead-letter topic (counter).
pub const MQTT_DEAD_LETTERS_TOTAL: &str = "dbx_mqtt_dead_letters_published_total";
/// MQTT input: messages dropped without a verdict (counter, label `reason` = saturated |
/// rate_limited | spool_full | dead_letter_overflow); QoS 0 only, and dead-letter notices.
pub const MQTT_DROPPED_TOTAL: &str = "dbx_mqtt_dropped_total";
/// MQTT input: QoS 1 messages received and not yet acknowledged (gauge).
pub const MQTT_IN_FLIGHT: &str = "dbx_mqtt_in_flight_messages";
/// MQTT input: 1 while connected to the broker and subscribed, else 0 (gauge).
pub const MQTT_CONNECTED: &str = "dbx_mqtt_connected";
/// MQTT input: lost or failed broker connections (counter; each is followed by a reconnect).
pub const MQTT_RECONNECTS_TOTAL: &str = "dbx_mqtt_reconnects_total";
/// MQTT input: reconnects on which the broker had no session for us any more (counter; QoS 1
/// messages it held for us were lost at the broker).
pub const MQTT_SESSIONS_LOST_TOTAL: &str = "dbx_mqtt_sessions_lost_total";
/// MQTT input: messages the broker delivered again (DUP flag) (counter).
pub const MQTT_REDELIVERED_TOTAL: &str = "dbx_mqtt_redelivered_total";
/// MQTT input: message received → PUBACK handed to the client (histogram, seconds).
pub const MQTT_ACK_LATENCY_SECONDS: &str = "dbx_mqtt_ack_latency_seconds";

/// Batcher: points committed (counter).
pub const POINTS_WRITTEN_TOTAL: &str = "dbx_points_written_total";
/// Batcher: points dropped as already stored (counter).
pub const POINTS_DEDUPLICATED_TOTAL: &str = "dbx_points_deduplicated_total";
/// Batcher: COPY flushes (counter, label `trigger` = rows | bytes | age | shutdown).
pub const BATCHES_FLUSHED_TOTAL: &str = "dbx_batches_flushed_total";
/// Batcher: rows per flush (histogram).
pub const FLUSH_ROWS: &str = "dbx_flush_rows";
/// Batcher: bytes per flush (histogram).
pub const FLUSH_BYTES: &str = "dbx_flush_bytes";
/// Batcher: COPY + commit duration (histogram, seconds).
pub const COPY_DURATION_SECONDS: &str = "dbx_copy_duration_seconds";
/// Batcher: batches waiting in the listener → batcher queue (gauge).
pub const QUEUE_DEPTH: &str = "dbx_queue_depth";
/// Batcher: capacity of that queue (gauge).
pub const QUEUE_CAPACITY: &str = "dbx_queue_capacity";
/// Batcher: retries (counter, label `kind` = transient | unique_violation).
pub const RETRIES_TOTAL: &str = "dbx_write_retries_total";
/// Batcher: pool connections in use (gauge).
pub const POOL_IN_USE: &str = "dbx_pool_connections_in_use";
/// Batcher: pool connections idle (gauge).
pub const POOL_IDLE: &str = "dbx_pool_connections_idle";
/// Batcher: rows written to the default partition (counter).
pub const ROWS_TO_DEFAULT_PARTITION_TOTAL: &str = "dbx_rows_default_partition_total";
/// Batcher: commit → ack handed to the connection (histogram, seconds).
pub const COMMIT_TO_ACK_SECONDS: &str = "dbx_commit_to_ack_seconds";
/// Batcher: batches nacked for a data error (counter).
pub const BATCHES_REJECTED_TOTAL: &str = "dbx_batches_rejected_total";
/// Flight sessions completed (counter, label `reason` = end | idle): by a gateway's
/// `end`, or by the control plane after `sessions.idle_timeout_secs` without a point.
pub const SESSIONS_COMPLETED_TOTAL: &str = "dbx_sessions_completed_total";

/// Control: database health indicators (gauges; prefix for `dbx_db_*`).
pub const DB_PREFIX: &str = "dbx_db_";
/// Control: partition maintenance runs (counter, label `kind`).
pub const MAINTENANCE_RUNS_TOTAL: &str = "dbx_maintenance_runs_total";
/// Control: partition maintenance failures (counter, label `kind`).
pub const MAINTENANCE_FAILURES_TOTAL: &str = "dbx_maintenance_failures_total";
/// Process: seconds since start (gauge).
pub const UPTIME_SECONDS: &str = "dbx_uptime_seconds";

/// Control: partition maintenance steps skipped after their lock attempts ran out
/// (counter, label `kind`); the next run retries them.
pub const MAINTENANCE_SKIPPED_TOTAL: &str = "dbx_maintenance_skipped_total";

/// Control: admin HTTP requests refused for a missing or wrong bearer token
/// (`admin.token_file`) (counter).
pub const ADMIN_UNAUTHORIZED_TOTAL: &str = "dbx_admin_unauthorized_total";

/// Control: `dbx_aviation.api_requests` rows deleted by their retention
/// (`partitions.api_requests_retention_days`) (counter).
pub const API_REQUESTS_EXPIRED_TOTAL: &str = "dbx_api_requests_expired_total";

/// Control: 1 when the last health collection succeeded, 0 when the database did not answer (gauge).
pub const DB_UP: &str = "dbx_db_up";
/// Control: `system_health` database_size (gauge, bytes).
pub const DB_SIZE_BYTES: &str = "dbx_db_size_bytes";
/// Control: `system_health` active_connections to this database (gauge).
pub const DB_ACTIVE_CONNECTIONS: &str = "dbx_db_active_connections";
/// Control: `system_health` slow_queries_count (gauge; only exported while
/// pg_stat_statements is installed and preloaded).
pub const DB_SLOW_QUERIES: &str = "dbx_db_slow_queries";
/// Control: `system_health` cache_hit_ratio as a 0..1 ratio (gauge).
pub const DB_CACHE_HIT_RATIO: &str = "dbx_db_cache_hit_ratio";
/// Control: estimated bloat per table (gauge, bytes, label `table`; the partitions of the
/// live and archive telemetry parents are summed under their parent's name).
pub const DB_TABLE_BLOAT_BYTES: &str = "dbx_db_table_bloat_bytes";
/// Control: telemetry partitions (gauge, label `schema` = live | archive; the default partition
/// is not counted).
pub const DB_PARTITIONS: &str = "dbx_db_partitions";
/// Control: lower bound of the oldest partition (gauge, unix seconds, label `schema`).
pub const DB_PARTITION_OLDEST_START: &str = "dbx_db_partition_oldest_start_timestamp_seconds";
/// Control: upper bound of the newest partition (gauge, unix seconds, label `schema`).
pub const DB_PARTITION_NEWEST_END: &str = "dbx_db_partition_newest_end_timestamp_seconds";
/// Control: seconds from now to the upper bound of the newest live partition (gauge; alert
/// well before it reaches 0, when points would start landing in the default partition).
pub const DB_PARTITION_AHEAD_SECONDS: &str = "dbx_db_partition_ahead_seconds";
/// Control: rows in the default partition (gauge; should be 0, the sweep moves them out).
pub const DB_DEFAULT_PARTITION_ROWS: &str = "dbx_db_default_partition_rows";
/// Control: connections of the ingest role's members to this database (gauge).
pub const DB_INGEST_CONNECTIONS: &str = "dbx_db_ingest_connections";
/// Control: 1 when the health collector's connection to PostgreSQL is TLS-encrypted
/// (`pg_stat_ssl` of its own backend), 0 when it is plaintext (gauge).
pub const DB_TLS: &str = "dbx_db_tls";

/// Spool: bytes in segment files (gauge).
pub const SPOOL_BYTES: &str = "dbx_spool_bytes";
/// Spool: records in segment files, not yet deleted after commit (gauge).
pub const SPOOL_RECORDS: &str = "dbx_spool_records";
/// Spool: segment files (gauge).
pub const SPOOL_SEGMENTS: &str = "dbx_spool_segments";
/// Spool: how long the oldest spooled batch not yet written to PostgreSQL has waited since the daemon accepted it; 0 when none waits (gauge, seconds).
pub const SPOOL_OLDEST_RECORD_AGE_SECONDS: &str = "dbx_spool_oldest_record_age_seconds";
/// Spool: records written to the spool, fsynced (counter).
pub const SPOOL_WRITTEN_RECORDS_TOTAL: &str = "dbx_spool_written_records_total";
/// Spool: replayed records resolved by the batcher (counter; its rate is the replay rate).
pub const SPOOL_REPLAYED_RECORDS_TOTAL: &str = "dbx_spool_replayed_records_total";
/// Spool: torn or corrupt records detected and skipped (counter).
pub const SPOOL_CORRUPT_RECORDS_TOTAL: &str = "dbx_spool_corrupt_records_total";
/// Spool: batches that found the spool full or unwritable (counter, label `kind` = block | drop | rejected).
pub const SPOOL_FULL_TOTAL: &str = "dbx_spool_full_total";
/// Spool: 1 while the gate spools, 0 while it forwards directly (gauge).
pub const SPOOL_ACTIVE: &str = "dbx_spool_active";
/// Spool: acked batches the database refused on replay, kept as dead letters (counter).
pub const SPOOL_REJECTED_RECORDS_TOTAL: &str = "dbx_spool_rejected_records_total";
/// Spool: bytes of the dead letters under `spool.dir/rejected/` (gauge).
pub const SPOOL_REJECTED_BYTES: &str = "dbx_spool_rejected_bytes";
