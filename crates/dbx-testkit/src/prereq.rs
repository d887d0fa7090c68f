//! The programs, PostgreSQL extensions and the Python the tests need besides PostgreSQL,
//! found as `scripts/test` provides them. `scripts/test-tools` lists each program (and each
//! `pg-extension:<name>`) with its Debian package and the checks that need it;
//! `scripts/prereqs` (run by `scripts/test`) installs them and the project's Python
//! environment, whose interpreter it exports as `DBX_TEST_PYTHON`. A test asks here and gets a
//! path, or fails saying what is missing, which check needs it and how to get it: a missing
//! prerequisite is never a skipped check.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// `scripts/test-tools`, compiled in so a test and `scripts/prereqs` read the same list.
const TOOLS: &str = include_str!("../../../scripts/test-tools");

/// The variable naming the Python interpreter of the test environment.
pub const PYTHON_VAR: &str = "DBX_TEST_PYTHON";

/// The prefix of a `scripts/test-tools` line naming a PostgreSQL extension.
pub const PG_EXTENSION_PREFIX: &str = "pg-extension:";

/// What a line of `scripts/test-tools` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    /// A program on PATH.
    Program,
    /// A PostgreSQL extension of the server the tests run (`pg-extension:<name>`): its
    /// `<sharedir>/extension/<name>.control` file.
    PgExtension,
}

/// One line of `scripts/test-tools`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    /// A program or an extension.
    pub kind: ToolKind,
    /// The program as looked up on PATH, or the extension's name (without the prefix).
    pub name: String,
    /// The Debian package that installs it; for an extension with `{major}` standing for the
    /// server's major version (see [`ToolSpec::package_for`]).
    pub package: String,
    /// The checks that need it, for the message when it is missing.
    pub needed_by: String,
}

impl ToolSpec {
    /// The Debian package for a PostgreSQL server of major version `major`.
    pub fn package_for(&self, major: u32) -> String {
        self.package.replace("{major}", &major.to_string())
    }
}

/// Every line of `scripts/test-tools`.
pub fn tool_specs() -> Vec<ToolSpec> {
    TOOLS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace();
            let mut next = || words.next().map(str::to_string).unwrap_or_default();
            let (first, package) = (next(), next());
            let needed_by = words.collect::<Vec<_>>().join(" ");
            assert!(
                !package.is_empty() && !needed_by.is_empty(),
                "scripts/test-tools: {l:?} needs a program, a Debian package and what needs it"
            );
            let (kind, name) = match first.strip_prefix(PG_EXTENSION_PREFIX) {
                Some(ext) => (ToolKind::PgExtension, ext.to_string()),
                None => {
                    assert!(
                        !first.contains(':'),
                        "scripts/test-tools: unknown kind {first:?}"
                    );
                    (ToolKind::Program, first)
                }
            };
            ToolSpec {
                kind,
                name,
                package,
                needed_by,
            }
        })
        .collect()
}

/// The line of `scripts/test-tools` for `name` of `kind`, or the message for an unlisted one.
fn spec_of(kind: ToolKind, name: &str) -> Result<ToolSpec, String> {
    tool_specs()
        .into_iter()
        .find(|s| s.kind == kind && s.name == name)
        .ok_or_else(|| {
            let line = match kind {
                ToolKind::Program => format!("{name} (program"),
                ToolKind::PgExtension => format!("{PG_EXTENSION_PREFIX}{name} (extension"),
            };
            format!(
                "{name} is not listed in scripts/test-tools: add a line {line}, Debian package, \
                 the checks that need it) so scripts/test installs it"
            )
        })
}

/// The path of `program`, which must be listed in `scripts/test-tools`; panics, naming the
/// checks that need it and the command that installs it, when it is not on PATH.
pub fn tool(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    tool_on(program, &path).unwrap_or_else(|e| panic!("{e}"))
}

/// [`tool`] with an explicit PATH; the error is the message [`tool`] panics with.
pub fn tool_on(program: &str, path: &OsStr) -> Result<PathBuf, String> {
    let spec = spec_of(ToolKind::Program, program)?;
    find_on_path(program, path).ok_or_else(|| {
        format!(
            "{program} is not installed; needed by {}. Run the tests with scripts/test, \
             which installs it (as root; otherwise it prints the command), or install it: \
             apt-get install -y --no-install-recommends {}",
            spec.needed_by, spec.package
        )
    })
}

/// The control file of PostgreSQL extension `name` (a `pg-extension:` line of
/// `scripts/test-tools`) for the server the tests run, the one dbx-testkit starts; panics,
/// naming the checks that need it and the package for that server's major version, when the
/// server does not offer it.
pub fn pg_extension(name: &str) -> PathBuf {
    let bindir =
        dbx_localpg::cluster::LocalCluster::find_bindir().unwrap_or_else(|e| panic!("{name}: {e}"));
    let (major, sharedir) = pg_server(&bindir).unwrap_or_else(|e| panic!("{name}: {e}"));
    pg_extension_in(name, major, &sharedir).unwrap_or_else(|e| panic!("{e}"))
}

/// [`pg_extension`] for a server of major version `major` whose share directory is
/// `sharedir`; the error is the message [`pg_extension`] panics with.
pub fn pg_extension_in(name: &str, major: u32, sharedir: &Path) -> Result<PathBuf, String> {
    let spec = spec_of(ToolKind::PgExtension, name)?;
    let control = sharedir.join("extension").join(format!("{name}.control"));
    if control.is_file() {
        return Ok(control);
    }
    Err(format!(
        "the PostgreSQL {major} extension {name} is not installed ({} is missing); needed by \
         {}. Run the tests with scripts/test, which installs it (as root; otherwise it prints \
         the command), or install it: apt-get install -y --no-install-recommends {}",
        control.display(),
        spec.needed_by,
        spec.package_for(major)
    ))
}

/// The major version and the share directory of the server in `bindir`, as
/// `scripts/prereqs` finds them (`postgres --version`, `pg_config --sharedir`, else Debian's
/// `/usr/share/postgresql/<major>`).
pub fn pg_server(bindir: &Path) -> Result<(u32, PathBuf), String> {
    let postgres = bindir.join("postgres");
    let out = std::process::Command::new(&postgres)
        .arg("--version")
        .output()
        .map_err(|e| format!("running {} --version: {e}", postgres.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .split_once(") ")
        .and_then(|(_, v)| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| format!("cannot tell the version of {}: {text}", postgres.display()))?;
    let sharedir = std::process::Command::new(bindir.join("pg_config"))
        .arg("--sharedir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from(format!("/usr/share/postgresql/{major}")));
    Ok((major, sharedir))
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
            .map(|s| (s.name.as_str(), s.package.as_str()))
            .collect();
        for want in [
            ("python3", "python3-venv"),
            ("promtool", "prometheus"),
            ("haproxy", "haproxy"),
            ("systemd-analyze", "systemd"),
            ("prometheus", "prometheus"),
            ("postgis", "postgresql-{major}-postgis-3"),
        ] {
            assert!(pairs.contains(&want), "{want:?} not in {pairs:?}");
        }
        assert!(specs.iter().all(|s| s.needed_by.contains("tests/")));
        let postgis = specs.iter().find(|s| s.name == "postgis").expect("postgis");
        assert_eq!(postgis.kind, ToolKind::PgExtension);
        assert_eq!(postgis.package_for(16), "postgresql-16-postgis-3");
        assert!(specs
            .iter()
            .filter(|s| s.name != "postgis")
            .all(|s| s.kind == ToolKind::Program));
    }

    #[test]
    fn a_missing_extension_names_the_package_of_the_servers_major_version() {
        let dir = tempfile::tempdir().unwrap();
        let e = pg_extension_in("postgis", 17, dir.path()).unwrap_err();
        assert!(
            e.contains("PostgreSQL 17 extension postgis is not installed"),
            "{e}"
        );
        assert!(e.contains("extension/postgis.control is missing"), "{e}");
        assert!(e.contains("crates/dbx-control/tests/schema"), "{e}");
        assert!(
            e.contains("apt-get install -y --no-install-recommends postgresql-17-postgis-3"),
            "{e}"
        );
        std::fs::create_dir(dir.path().join("extension")).unwrap();
        std::fs::write(dir.path().join("extension/postgis.control"), "").unwrap();
        assert_eq!(
            pg_extension_in("postgis", 17, dir.path()).unwrap(),
            dir.path().join("extension/postgis.control")
        );
        // A program is not an extension, nor the other way round.
        let e = pg_extension_in("haproxy", 17, dir.path()).unwrap_err();
        assert!(e.contains("not listed in scripts/test-tools"), "{e}");
        assert!(tool_on("postgis", OsStr::new("/bin:/usr/bin"))
            .unwrap_err()
            .contains("not listed"));
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
