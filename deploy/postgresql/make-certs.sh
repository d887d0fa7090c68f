#!/bin/sh
# Certificates for TLS between dbx and PostgreSQL, from a private CA (openssl).
#
#   make-certs.sh server CA_DIR OUT_DIR NAME [NAME...]
#       Makes the CA in CA_DIR (ca.key, ca.crt) unless it is there, then OUT_DIR/server.crt
#       and server.key for the NAMEs (DNS names or IP addresses: what clients put in their
#       URL, checked by sslmode=verify-full) and a copy of ca.crt (the server's ssl_ca_file).
#   make-certs.sh client CA_DIR OUT_DIR USER
#       OUT_DIR/USER.crt and USER.key, a client certificate with CN=USER for `cert` lines
#       in pg_hba.conf (dbx: sslcert / sslkey).
#
# Existing certificates are kept (delete them to re-issue). Keys are mode 0600; with
# PG_OWNER=postgres (or a uid) server.key is given to that user, as PostgreSQL requires.
# Clients get ca.crt only (dbx: sslrootcert); keep ca.key off the database and dbx hosts.
# Environment: DAYS (validity of the certificates, default 825), CA_DAYS (default 3650).
set -eu

usage() { sed -n '2,17p' "$0" >&2; exit 2; }
command -v openssl >/dev/null 2>&1 || { echo "make-certs.sh: openssl not found" >&2; exit 1; }
[ $# -ge 4 ] || usage
kind=$1 ca_dir=$2 out=$3
shift 3
DAYS=${DAYS:-825}
CA_DAYS=${CA_DAYS:-3650}
umask 077
mkdir -p "$ca_dir" "$out"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -s "$ca_dir/ca.crt" ]; then
    key "$ca_dir/ca.key"
    openssl req -x509 -new -key "$ca_dir/ca.key" -sha256 -days "$CA_DAYS" \
        -subj "/CN=dbx PostgreSQL CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$ca_dir/ca.crt"
    chmod 0644 "$ca_dir/ca.crt"
    echo "made CA $ca_dir/ca.crt"
fi

# sign NAME CN EXTFILE: OUT/NAME.crt from a new OUT/NAME.key.
sign() {
    key "$out/$1.key"
    openssl req -new -key "$out/$1.key" -subj "/CN=$2" -out "$out/$1.csr"
    openssl x509 -req -in "$out/$1.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
        -CAcreateserial -days "$DAYS" -sha256 -extfile "$3" -out "$out/$1.crt" 2>/dev/null
    rm -f "$out/$1.csr" "$3"
    chmod 0644 "$out/$1.crt"
    chmod 0600 "$out/$1.key"
}

case $kind in
server)
    # The server's user must reach its files; the key itself stays 0600.
    chmod 0755 "$out"
    if [ -s "$out/server.crt" ]; then
        echo "kept $out/server.crt"
    else
        san=""
        for name in "$@"; do
            case $name in
            *:*) entry="IP:$name" ;;      # IPv6
            *[!0-9.]*) entry="DNS:$name" ;;
            *) entry="IP:$name" ;;        # IPv4
            esac
            san="${san:+$san,}$entry"
        done
        ext=$(mktemp)
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' \
            "$san" >"$ext"
        sign server "$1" "$ext"
        echo "made $out/server.crt for $san"
    fi
    cp "$ca_dir/ca.crt" "$out/ca.crt"
    chmod 0644 "$out/ca.crt"
    if [ -n "${PG_OWNER:-}" ]; then
        chown "$PG_OWNER" "$out/server.key" "$out/server.crt" "$out/ca.crt"
    fi
    ;;
client)
    [ $# -eq 1 ] || usage
    if [ -s "$out/$1.crt" ]; then
        echo "kept $out/$1.crt"
    else
        ext=$(mktemp)
        printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' >"$ext"
        sign "$1" "$1" "$ext"
        echo "made $out/$1.crt (CN=$1)"
    fi
    ;;
*) usage ;;
esac
