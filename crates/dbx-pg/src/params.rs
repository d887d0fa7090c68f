//! Takes libpq's TLS parameters out of a connection string before tokio-postgres sees it.
//!
//! tokio-postgres parses `sslmode` only up to `require` (it rejects `verify-ca` and
//! `verify-full`) and refuses `sslrootcert`, `sslcert` and `sslkey` as unknown options. So
//! these parameters, and `sslnegotiation`, are removed here from both forms a connection
//! string can take — a URL (`postgresql://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem`)
//! and libpq's `key=value` form (`host=h sslmode=verify-full sslrootcert='/ca.pem'`) — and
//! the rest is given back unchanged (URL) or re-quoted (`key=value`) for tokio-postgres.
//! A parameter given twice counts with its last value, as in libpq.
//!
//! It also builds the parts of URLs dbx writes for others ([`urlencode`], [`query`]).

use percent_encoding::percent_decode_str;

/// The parameters this module takes out.
pub const TLS_PARAMS: [&str; 5] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslnegotiation",
];

/// A connection string split in two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The connection string without the TLS parameters, for tokio-postgres.
    pub rest: String,
    /// The TLS parameters found, decoded, in order of appearance.
    pub tls: Vec<(String, String)>,
}

impl Split {
    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.tls
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits `conn` (a URL or a `key=value` string). The error says what is malformed.
pub fn split(conn: &str) -> Result<Split, String> {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        split_url(conn)
    } else {
        split_key_values(conn)
    }
}

fn decode(s: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{s:?} is not valid UTF-8 once percent-decoded"))
}

/// The query of a URL starts at the first `?` after the first `@` (tokio-postgres reads the
/// credentials up to the first `@`, so a `?` in a password must be percent-encoded anyway).
fn split_url(url: &str) -> Result<Split, String> {
    let after_credentials = url.find('@').map(|at| at + 1).unwrap_or(0);
    let Some(q) = url[after_credentials..].find('?') else {
        return Ok(Split {
            rest: url.to_string(),
            tls: Vec::new(),
        });
    };
    let (base, query) = url.split_at(after_credentials + q);
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for pair in query[1..].split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("URL parameter {pair:?} has no value (key=value)"))?;
        let key_decoded = decode(key)?;
        if TLS_PARAMS.contains(&key_decoded.as_str()) {
            tls.push((key_decoded, decode(value)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Split { rest, tls })
}

/// libpq's `key = value` syntax: values unquoted (backslash escapes the next character) or
/// in single quotes (backslash escapes `'` and `\`).
fn split_key_values(conn: &str) -> Result<Split, String> {
    let mut it = conn.chars().peekable();
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if it.peek().is_some() {
                return Err("a connection parameter has no name before `=`".into());
            }
            break;
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(format!("connection parameter {key:?} has no `=` and value"));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let value = if it.next_if_eq(&'\'').is_some() {
            let mut v = String::new();
            loop {
                match it.next() {
                    Some('\'') => break,
                    Some('\\') => v.extend(it.next()),
                    Some(c) => v.push(c),
                    None => return Err(format!("the quoted value of {key:?} is not terminated")),
                }
            }
            v
        } else {
            let mut v = String::new();
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    v.extend(it.next());
                } else {
                    v.push(c);
                }
            }
            if v.is_empty() {
                return Err(format!("connection parameter {key:?} has an empty value"));
            }
            v
        };
        if TLS_PARAMS.contains(&key.as_str()) {
            tls.push((key, value));
        } else {
            kept.push(format!("{key}='{}'", quote(&value)));
        }
    }
    Ok(Split {
        rest: kept.join(" "),
        tls,
    })
}

fn quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

/// What must be percent-encoded in a query value: what would end or split it, and `%`.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'=')
    .add(b'?')
    .add(b'@');

/// What must be percent-encoded in a URL's user, password, path or query value built by
/// dbx: everything but the unreserved characters of RFC 3986 (letters, digits, `-._~`).
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` percent-encoded for any part of a URL (user, password, database, a query value):
/// every byte but the unreserved characters, so that nothing in it can end or split the
/// part (`dbx setup`'s URLs, the local cluster's, the tests').
pub fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).to_string()
}

/// `postgresql://user:password@host:port/db`, each of user, password and database
/// percent-encoded ([`urlencode`]); `host` is taken as given. The one way dbx writes a
/// connection URL from its parts (`dbx setup`'s credentials, the local cluster's, the tests').
pub fn url(user: &str, password: &str, host: &str, port: u16, db: &str) -> String {
    format!(
        "postgresql://{}:{}@{host}:{port}/{}",
        urlencode(user),
        urlencode(password),
        urlencode(db)
    )
}

/// A query string (`k=v&k=v`, values percent-encoded where needed) of `pairs`, for URLs
/// built from others.
pub fn query(pairs: &[(String, String)]) -> String {
    use percent_encoding::utf8_percent_encode;
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, QUERY_VALUE)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencode_keeps_only_unreserved_characters() {
        assert_eq!(urlencode("aZ09-._~"), "aZ09-._~");
        assert_eq!(urlencode("p@ss:w/rd?#%"), "p%40ss%3Aw%2Frd%3F%23%25");
        assert_eq!(urlencode("é "), "%C3%A9%20");
        assert_eq!(
            percent_decode_str(&urlencode("a b/c@d")).decode_utf8_lossy(),
            "a b/c@d"
        );
    }

    fn pairs(s: &Split) -> Vec<(&str, &str)> {
        s.tls
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept_as_written() {
        let s = split(
            "postgresql://u:p%3Fw@db.example:6432/dbx?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fdbx%2Fca.pem&connect_timeout=5&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(
            s.rest,
            "postgresql://u:p%3Fw@db.example:6432/dbx?application_name=x&connect_timeout=5"
        );
        assert_eq!(
            pairs(&s),
            [
                ("sslmode", "verify-full"),
                ("sslrootcert", "/etc/dbx/ca.pem"),
                ("sslcert", "/c.pem"),
                ("sslkey", "/k.pem")
            ]
        );
        // What is left parses, with everything but TLS intact.
        let cfg: tokio_postgres::Config = s.rest.parse().unwrap();
        assert_eq!(cfg.get_dbname(), Some("dbx"));
        assert_eq!(cfg.get_password(), Some(&b"p?w"[..]));
        assert_eq!(
            cfg.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(5))
        );
    }

    #[test]
    fn a_url_without_tls_parameters_is_unchanged() {
        for url in [
            "postgresql://u@h/db",
            "postgres://h",
            "postgresql://u@h/db?application_name=a",
            "postgresql://h/db?sslmode=require",
        ] {
            let s = split(url).unwrap();
            if url.contains("sslmode") {
                assert_eq!(s.rest, "postgresql://h/db");
                assert_eq!(s.get("sslmode"), Some("require"));
            } else {
                assert_eq!(s.rest, url);
                assert!(s.tls.is_empty());
            }
        }
    }

    #[test]
    fn the_last_of_a_repeated_parameter_counts() {
        let s = split("postgresql://h/db?sslmode=require&sslmode=verify-ca").unwrap();
        assert_eq!(s.get("sslmode"), Some("verify-ca"));
    }

    #[test]
    fn key_value_strings_are_split_and_requoted() {
        let s = split(
            "host=db.example port = 5432 user=dbx password='it\\'s' sslmode=verify-full \
             sslrootcert='/etc/my certs/ca.pem' dbname=a\\ b",
        )
        .unwrap();
        assert_eq!(
            pairs(&s),
            [
                ("sslmode", "verify-full"),
                ("sslrootcert", "/etc/my certs/ca.pem")
            ]
        );
        let cfg: tokio_postgres::Config = s.rest.parse().unwrap();
        assert_eq!(cfg.get_password(), Some(&b"it's"[..]));
        assert_eq!(cfg.get_dbname(), Some("a b"));
        assert_eq!(cfg.get_ports(), [5432]);
    }

    #[test]
    fn malformed_strings_say_what_is_wrong() {
        assert!(split("host=h password='open")
            .unwrap_err()
            .contains("not terminated"));
        assert!(split("host").unwrap_err().contains("has no `=`"));
        assert!(split("postgresql://h/db?sslmode")
            .unwrap_err()
            .contains("has no value"));
    }

    #[test]
    fn query_encodes_values() {
        let q = query(&[("sslrootcert".into(), "/a b/c&a@.pem".into())]);
        assert_eq!(q, "sslrootcert=/a%20b/c%26a%40.pem");
        let s = split(&format!("postgresql://h/d?{q}")).unwrap();
        assert_eq!(s.get("sslrootcert"), Some("/a b/c&a@.pem"));
    }
}
