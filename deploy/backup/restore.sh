#!/usr/bin/env bash
# Point-in-time recovery of a dbx database server (PostgreSQL 12+; seed section 6.2).
#
#   restore.sh --base /backup/base/20261122T030000Z --wal /backup/wal \
#              --target-time '2026-11-26 14:59:00+00' --pgdata /var/lib/postgresql/15/restore
#
# Lays out a new data directory from a base backup (`backup.sh base`: base.tar.gz and
# pg_wal.tar.gz, or a plain-format copy), and configures recovery: restore_command
# fetches archived WAL, recovery_target_time stops the replay at the given moment
# (transactions committed at or before it are kept, later ones are not), then the
# server promotes itself and opens read-write on a new timeline. recovery.signal
# (PostgreSQL 12+) makes the server start in targeted recovery.
#
# Start it afterwards (pg_ctl -D <pgdata> -l <logfile> start, or the service unit with
# data_directory pointing there); check the log for "recovery stopping before commit"
# and "archive recovery complete". The base backup must be older than the target time,
# and the archive must hold every WAL segment from the backup up to a commit after
# the target (otherwise PostgreSQL stops with "recovery ended before configured
# recovery target was reached" — nothing is lost, add the missing WAL and start again).
#
# Run as the operating-system user that owns PostgreSQL (sudo -u postgres restore.sh ...).
#
# Options:
#   --base DIR             base backup directory (required)
#   --wal DIR              WAL archive directory, as archive_command writes it (required)
#   --target-time TIME     timestamp with time zone, e.g. '2026-11-26 14:59:00+00' (required)
#   --pgdata DIR           new data directory; must not exist or be empty (required)
#   --exclusive            stop just before the target instead of just after it
#   --keep-archiving       keep archive_mode of the backed-up server. By default the
#                          restored server does not archive: a copy restored for
#                          inspection must not write into the archive of the server it
#                          came from. Turn it back on when it becomes the new primary.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "restore.sh: $*" >&2; exit 1; }

base= wal= target= pgdata= inclusive=true keep_archiving=false
while [[ $# -gt 0 ]]; do
    case "$1" in
    --base) base=${2:-}; shift 2 ;;
    --wal) wal=${2:-}; shift 2 ;;
    --target-time) target=${2:-}; shift 2 ;;
    --pgdata) pgdata=${2:-}; shift 2 ;;
    --exclusive) inclusive=false; shift ;;
    --keep-archiving) keep_archiving=true; shift ;;
    -h|--help) usage ;;
    *) echo "restore.sh: unknown option $1" >&2; usage ;;
    esac
done
[[ -n "$base" && -n "$wal" && -n "$target" && -n "$pgdata" ]] || usage
[[ "$(id -u)" != 0 ]] || die "run as the PostgreSQL owner (sudo -u postgres $0 ...), not root: the server refuses files it cannot own"
[[ -d "$base" ]] || die "no base backup at $base"
[[ -d "$wal" ]] || die "no WAL archive at $wal"
# Quotes would break out of the settings written below.
[[ "$target" != *"'"* && "$wal" != *"'"* ]] || die "quotes are not allowed in --target-time or --wal"
if [[ -e "$pgdata" && -n "$(ls -A "$pgdata" 2>/dev/null)" ]]; then
    die "$pgdata is not empty: restore into a new directory (never over a running cluster)"
fi
wal=$(cd "$wal" && pwd)

mkdir -p "$pgdata"
chmod 700 "$pgdata"
if [[ -f "$base/base.tar.gz" || -f "$base/base.tar" ]]; then
    tarball=$base/base.tar.gz; [[ -f "$tarball" ]] || tarball=$base/base.tar
    echo "restore.sh: extracting $tarball" >&2
    tar -xf "$tarball" -C "$pgdata"
    for w in "$base/pg_wal.tar.gz" "$base/pg_wal.tar"; do
        if [[ -f "$w" ]]; then
            tar -xf "$w" -C "$pgdata/pg_wal"
            break
        fi
    done
    # Tablespaces (<oid>.tar[.gz]) would need their own locations: dbx uses none.
    if compgen -G "$base/[0-9]*.tar*" > /dev/null; then
        die "the backup has tablespace archives; extract them by hand (see pg_basebackup docs)"
    fi
elif [[ -f "$base/PG_VERSION" ]]; then
    echo "restore.sh: copying $base" >&2
    cp -a "$base/." "$pgdata/"
else
    die "$base holds neither base.tar[.gz] nor a plain data directory"
fi
# Leftovers of the server the backup came from must not be mistaken for this one's.
rm -f "$pgdata/postmaster.pid" "$pgdata/postmaster.opts" "$pgdata/standby.signal"

# postgresql.auto.conf is read last, so these win over the backed-up postgresql.conf.
{
    echo ""
    echo "# Added by restore.sh on $(date -u +%FT%TZ): point-in-time recovery."
    echo "restore_command = 'cp $wal/%f %p'"
    echo "recovery_target_time = '$target'"
    echo "recovery_target_inclusive = $inclusive"
    echo "recovery_target_action = 'promote'"
    if [[ "$keep_archiving" != true ]]; then
        echo "archive_mode = off"
    fi
} >> "$pgdata/postgresql.auto.conf"
touch "$pgdata/recovery.signal"
chmod -R go-rwx "$pgdata"

cat >&2 <<MSG
restore.sh: $pgdata is ready for recovery to $target.
Start it: pg_ctl -D $pgdata -l $pgdata/restore.log start
It replays WAL from $wal, stops at the target, promotes and opens read-write.
Remove the restore_command/recovery_target_* lines from postgresql.auto.conf afterwards.
MSG
