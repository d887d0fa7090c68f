#!/usr/bin/env bash
# dbx backups (seed section 6.2), run from cron or a systemd timer.
#
#   backup.sh dump   weekly logical backup: pg_dump --format=custom --compress=9 of
#                    dbx_aviation into $BACKUP_DIR/weekly/, verified with pg_restore --list
#   backup.sh base   physical base backup (pg_basebackup, tar + gzip, with its WAL) into
#                    $BACKUP_DIR/base/<UTC time>/: together with the WAL archive
#                    (wal-archiving.conf) it is what restore.sh needs for point-in-time
#                    recovery. Take one weekly too: replay time grows with the WAL since.
#
# Both keep the newest $KEEP backups of their kind and delete older ones (only after a
# new one succeeded). Connection: the usual libpq variables (PGHOST, PGPORT, PGUSER,
# PGPASSWORD or ~/.pgpass / PGPASSFILE); `dump` needs a role that can read every table
# (the seed uses dbx_admin's member dbx_maintenance_service; RLS: use a superuser or a
# role with BYPASSRLS, or rows of other organizations are silently missing), `base` a
# role with REPLICATION.
#
# Environment (defaults):
#   BACKUP_DIR=/backup        PGDATABASE=dbx_aviation      KEEP=4
#   PG_BINDIR=                directory of pg_dump/pg_basebackup (default: PATH)
#   DBX_BACKUP_TEXTFILE_DIR=  node_exporter textfile-collector directory; when set, a
#       successful run writes dbx_backup_<kind>.prom there with
#         dbx_backup_last_success_timestamp_seconds{kind="dump|base"}  (unix time)
#         dbx_backup_size_bytes{kind="dump|base"}
#       which deploy/prometheus/alerts.yml watches (DbxBackupTooOld).
#
# Crontab example (Sunday 02:00 dump, 03:00 base backup):
#   0 2 * * 0  postgres  /usr/local/lib/dbx/backup.sh dump
#   0 3 * * 0  postgres  /usr/local/lib/dbx/backup.sh base
#
# Old WAL: once the oldest kept base backup is newer than a WAL file, that file is no
# longer needed: `pg_archivecleanup /backup/wal <oldest base backup's first WAL file>`
# (its name is in the backup's backup_manifest / backup_label).
set -euo pipefail

kind=${1:-dump}
BACKUP_DIR=${BACKUP_DIR:-/backup}
KEEP=${KEEP:-4}
export PGDATABASE=${PGDATABASE:-dbx_aviation}
bin() { if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR/$1"; else echo "$1"; fi; }
log() { printf '%s backup.sh %s: %s\n' "$(date -u +%FT%TZ)" "$kind" "$*" >&2; }

[[ "$KEEP" =~ ^[1-9][0-9]*$ ]] || { log "KEEP must be a positive integer, not '$KEEP'"; exit 2; }
stamp=$(date -u +%Y%m%dT%H%M%SZ)

# Deletes all but the newest $KEEP entries matching a glob (names sort by time).
rotate() {
    local dir=$1 pattern=$2
    local -a all
    mapfile -t all < <(find "$dir" -mindepth 1 -maxdepth 1 -name "$pattern" -printf '%f\n' | sort)
    local n=$(( ${#all[@]} - KEEP ))
    local i
    for (( i = 0; i < n; i++ )); do
        log "rotating out ${all[i]}"
        rm -rf -- "${dir:?}/${all[i]}"
    done
}

# Records a success for Prometheus (node_exporter textfile collector), atomically.
textfile() {
    local size=$1
    [[ -n "${DBX_BACKUP_TEXTFILE_DIR:-}" ]] || return 0
    local out="$DBX_BACKUP_TEXTFILE_DIR/dbx_backup_$kind.prom"
    cat > "$out.$$" <<PROM
# HELP dbx_backup_last_success_timestamp_seconds Unix time of the last successful dbx backup, by kind.
# TYPE dbx_backup_last_success_timestamp_seconds gauge
dbx_backup_last_success_timestamp_seconds{kind="$kind"} $(date -u +%s)
# HELP dbx_backup_size_bytes Size of the last successful dbx backup, by kind.
# TYPE dbx_backup_size_bytes gauge
dbx_backup_size_bytes{kind="$kind"} $size
PROM
    mv -f "$out.$$" "$out"
}

case "$kind" in
dump)
    dir="$BACKUP_DIR/weekly"
    mkdir -p "$dir"
    file="$dir/${PGDATABASE}_$stamp.dump"
    # Written under a temporary name: a dump cut short never counts as a backup, and
    # never pushes a good one out of the rotation.
    trap 'rm -f "$file.partial"' EXIT
    log "pg_dump of $PGDATABASE to $file"
    "$(bin pg_dump)" --format=custom --compress=9 --no-password --file="$file.partial"
    # A dump whose table of contents cannot be read is not a backup.
    "$(bin pg_restore)" --list "$file.partial" > /dev/null
    mv "$file.partial" "$file"
    trap - EXIT
    rotate "$dir" "${PGDATABASE}_*.dump"
    size=$(stat -c %s "$file")
    ;;
base)
    dir="$BACKUP_DIR/base"
    mkdir -p "$dir"
    target="$dir/$stamp"
    trap 'rm -rf "$target.partial"' EXIT
    log "pg_basebackup to $target"
    # -X stream: the WAL needed to make the copy consistent travels with it, so the
    # backup restores even if the archive misses those segments. --checkpoint=fast:
    # start now instead of waiting for the next scheduled checkpoint.
    "$(bin pg_basebackup)" --pgdata="$target.partial" --format=tar --gzip \
        --wal-method=stream --checkpoint=fast --label="dbx $stamp" --no-password
    mv "$target.partial" "$target"
    trap - EXIT
    rotate "$dir" '[0-9]*T[0-9]*Z'
    size=$(du -sb "$target" | cut -f1)
    ;;
*)
    echo "usage: backup.sh [dump|base]" >&2
    exit 2
    ;;
esac

textfile "$size"
log "done ($size bytes)"
