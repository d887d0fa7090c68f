//! The programs and the Python the tests run besides PostgreSQL, found as `scripts/test`
//! provides them. `scripts/test-tools` lists each program with its Debian package and the
//! checks that need it; `scripts/prereqs` (run by `scripts/test`) installs them and the
//! project's Python environment, whose interpreter it exports as `DBX_TEST_PYTHON`. A test
//! asks here and gets a path, or fails saying what is missing, which check needs it and how
//! to get it: a missing prerequisite is never a skipped check.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// `scripts/test-tools`, compiled in so a test and `scripts/prereqs` read the same list.
const TOOLS: &str = include_str!("../../../scripts/test-tools");

/// The variable naming the Python interpreter of the test environment.
pub const PYTHON_VAR: &str = "DBX_TEST_PYTHON";

/// One line of `scripts/test-tools`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    /// The program, as looked up on PATH.
    pub program: String,
    /// The Debian package that installs it.
    pub package: String,
    /// The checks that need it, for the message when it is missing.
    pub needed_by: String,
}

/// Every program `scripts/test-tools` lists.
pub fn tool_specs() -> Vec<ToolSpec> {
    TOOLS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace();
            let mut next = || words.next().map(str::to_string).unwrap_or_default();
            let (program, package) = (next(), next());
            let needed_by = words.collect::<Vec<_>>().join(" ");
            assert!(
                !package.is_empty() && !needed_by.is_empty(),
                "scripts/test-tools: {l:?} needs a program, a Debian package and what needs it"
            );
            ToolSpec {
                program,
                package,
                needed_by,
            }
        })
        .collect()
}

/// The path of `program`, which must be listed in `scripts/test-tools`; panics, naming the
/// checks that need it and the command that installs it, when it is not on PATH.
pub fn tool(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    tool_on(program, &path).unwrap_or_else(|e| panic!("{e}"))
}

/// [`tool`] with an explicit PATH; the error is the message [`tool`] panics with.
pub fn tool_on(program: &str, path: &OsStr) -> Result<PathBuf, String> {
    let spec = tool_specs()
        .into_iter()
        .find(|s| s.program == program)
        .ok_or_else(|| {
            format!(
                "{program} is not listed in scripts/test-tools: add a line for it (program, \
                 Debian package, the checks that need it) so scripts/test installs it"
            )
        })?;
    find_on_path(program, path).ok_or_else(|| {
        format!(
            "{program} is not installed; needed by {}. Run the tests with scripts/test, \
             which installs it (as root; otherwise it prints the command), or install it: \
             apt-get install -y --no-install-recommends {}",
            spec.needed_by, spec.package
        )
    })
}

/// The first file named `program` in the directories of `path` (a PATH value).
pub fn find_on_path(program: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The Python interpreter of the test environment (`target/pyenv`, with the packages of
/// `scripts/requirements-test.txt`), from `DBX_TEST_PYTHON`; panics saying how to get it
/// when the variable is not set or names no file.
pub fn python() -> PathBuf {
    python_from(std::env::var_os(PYTHON_VAR).as_deref()).unwrap_or_else(|e| panic!("{e}"))
}

/// [`python`] with the variable's value given; the error is the message [`python`] panics
/// with.
pub fn python_from(var: Option<&OsStr>) -> Result<PathBuf, String> {
    let how = "Run the tests with scripts/test, which creates the test Python environment \
               target/pyenv (scripts/requirements-test.txt) and sets it; for a single test by \
               hand: eval \"$(scripts/prereqs --env)\", then cargo test as usual";
    match var.filter(|v| !v.is_empty()) {
        None => Err(format!("{PYTHON_VAR} is not set. {how}")),
        Some(v) if !Path::new(v).is_file() => Err(format!(
            "{PYTHON_VAR}={} is not a file. {how}",
            Path::new(v).display()
        )),
        Some(v) => Ok(PathBuf::from(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_names_the_programs_the_tests_run_with_their_packages() {
        let specs = tool_specs();
        let pairs: Vec<(&str, &str)> = specs
            .iter()
            .map(|s| (s.program.as_str(), s.package.as_str()))
            .collect();
        for want in [
            ("python3", "python3-venv"),
            ("promtool", "prometheus"),
            ("haproxy", "haproxy"),
            ("systemd-analyze", "systemd"),
        ] {
            assert!(pairs.contains(&want), "{want:?} not in {pairs:?}");
        }
        assert!(specs.iter().all(|s| s.needed_by.contains("tests/")));
    }

    #[test]
    fn a_missing_tool_fails_naming_its_checks_and_its_install_command() {
        let e = tool_on("promtool", OsStr::new("")).unwrap_err();
        assert!(e.contains("promtool is not installed"), "{e}");
        assert!(e.contains("tests/control (promtool check metrics"), "{e}");
        assert!(e.contains("scripts/test"), "{e}");
        assert!(
            e.contains("apt-get install -y --no-install-recommends prometheus"),
            "{e}"
        );
    }

    #[test]
    fn a_tool_is_found_on_the_given_path_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("haproxy"), "").unwrap();
        assert_eq!(
            tool_on("haproxy", dir.path().as_os_str()).unwrap(),
            dir.path().join("haproxy")
        );
        assert!(tool_on("promtool", dir.path().as_os_str()).is_err());
    }

    #[test]
    fn an_unlisted_tool_is_refused_so_the_list_stays_complete() {
        let e = tool_on("sh", OsStr::new("/bin:/usr/bin")).unwrap_err();
        assert!(e.contains("not listed in scripts/test-tools"), "{e}");
    }

    #[test]
    fn without_the_variable_python_says_to_run_scripts_test() {
        for var in [None, Some(OsStr::new(""))] {
            let e = python_from(var).unwrap_err();
            assert!(e.contains("DBX_TEST_PYTHON is not set"), "{e}");
            assert!(e.contains("scripts/test"), "{e}");
        }
        let e = python_from(Some(OsStr::new("/nonexistent/python"))).unwrap_err();
        assert!(e.contains("/nonexistent/python is not a file"), "{e}");
        let file = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(
            python_from(Some(file.path().as_os_str())).unwrap(),
            file.path()
        );
    }
}
