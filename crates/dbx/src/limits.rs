//! The process's open-files limit. Every connection is a file descriptor, and the usual
//! soft limit of 1024 refuses sockets (EMFILE) long before a fleet of gateways is
//! connected: the daemon (`dbx serve`, `dbx demo`) and `dbx loadgen` raise the soft limit
//! to the hard one at start, and say so when even the hard limit is below what their
//! configuration asks for.

/// Raises the `RLIMIT_NOFILE` soft limit to the hard limit and returns the soft limit now
/// in force (`None` when it cannot be read). Logs a warning naming `setting` when that is
/// below `wanted` descriptors.
pub fn raise_open_files_limit(wanted: u64, setting: &str) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot read the open-files limit"
            );
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                tracing::debug!(
                    from = lim.rlim_cur,
                    to = lim.rlim_max,
                    "open-files soft limit raised to the hard limit"
                );
                lim.rlim_cur = lim.rlim_max;
            } else {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    soft = lim.rlim_cur,
                    hard = lim.rlim_max,
                    "cannot raise the open-files soft limit"
                );
            }
        }
        lim.rlim_cur
    };
    if soft < wanted {
        tracing::warn!(
            open_files = soft,
            hard_limit = lim.rlim_max,
            wanted,
            "the open-files limit is below what {setting} needs; raise the hard limit \
             (systemd LimitNOFILE, ulimit -Hn, /etc/security/limits.conf)"
        );
    }
    Some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> libc::rlimit {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid struct for this process.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        lim
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let before = current();
        if before.rlim_max > 512 {
            // Lower the soft limit (always allowed), then raise it back.
            let lowered = libc::rlimit {
                rlim_cur: 512,
                rlim_max: before.rlim_max,
            };
            // SAFETY: a valid struct for this process.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
            assert_eq!(current().rlim_cur, 512);
        }
        let soft = raise_open_files_limit(16, "the test").expect("readable");
        assert_eq!(soft, before.rlim_max);
        assert_eq!(current().rlim_cur, before.rlim_max);
        assert_eq!(current().rlim_max, before.rlim_max);
    }
}
