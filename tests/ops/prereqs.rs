//! The README's test command on a fresh machine (issue 15): `scripts/prereqs`, which
//! `scripts/test` runs first, brings every program of `scripts/test-tools` and the Python
//! environment `target/pyenv` with the pinned packages of `scripts/requirements-test.txt`.
//!
//! The script itself runs here for real in a sandbox: a copy of `scripts/` and a PATH of the
//! base programs it uses, where only what would change the machine is a stand-in (`apt-get`,
//! `python3` and the venv's Python log their arguments; `id` answers the uid under test; a
//! PostgreSQL of another major version than the machine's, named by `DBX_PG_BINDIR`, has the
//! share directory where extensions are looked for).
//! So both branches — root installs, a user gets the install command — are proven on any
//! machine, and repeated runs are shown to do nothing. The other tests here check the real
//! environment the suite runs with, and that no test starts a program the list misses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dbx_testkit::prereq::{
    find_on_path, pg_extension, python, tool, tool_specs, ToolKind, ToolSpec, PG_EXTENSION_PREFIX,
};

use crate::{read, repo, run_ok};

/// The programs `scripts/prereqs` runs that a fresh Debian has (coreutils, grep, util-linux).
const BASE_PROGRAMS: &[&str] = &[
    "bash",
    "dirname",
    "grep",
    "sort",
    "mkdir",
    "flock",
    "sha256sum",
    "cut",
    "rm",
    "cp",
    "chmod",
    "touch",
];

/// Stands in for apt-get: logs its arguments; `install` puts the stand-ins of the packages'
/// programs (`$SANDBOX/packages`: "package program" lines) into the sandbox's bin, and the
/// control files of their PostgreSQL extensions ("package pg-extension:name") into the
/// sandbox server's share directory.
const APT_GET: &str = r#"#!/usr/bin/env bash
echo "$*" >>"$SANDBOX/apt.log"
[[ " $* " == *" install "* ]] || exit 0
for arg; do
    touch "$SANDBOX/installed-$arg"
    while read -r package program; do
        if [[ $package == "$arg" && $program == pg-extension:* ]]; then
            touch "$SANDBOX/pgshare/extension/${program#pg-extension:}.control"
        elif [[ $package == "$arg" ]]; then
            cp "$SANDBOX/stubs/$program" "$SANDBOX/bin/$program"
            chmod +x "$SANDBOX/bin/$program"
        fi
    done <"$SANDBOX/packages"
done
"#;

/// The major version of the sandbox's PostgreSQL: not the machine's, so that a package name
/// is shown to follow the server found.
const SANDBOX_PG_MAJOR: u32 = 17;

/// Stands in for the sandbox server's `postgres`.
const POSTGRES: &str = "#!/usr/bin/env bash\necho 'postgres (PostgreSQL) 17.2 (Debian 17.2-1)'\n";

/// Stands in for the sandbox server's `pg_config`.
const PG_CONFIG: &str =
    "#!/usr/bin/env bash\n[[ $1 == --sharedir ]] && echo \"$SANDBOX/pgshare\"\n";

/// Stands in for the machine's python3: `-m venv DIR` makes DIR/bin/python, failing the way
/// Debian's python3 does until python3-venv is installed.
const PYTHON3: &str = r#"#!/usr/bin/env bash
echo "python3 $*" >>"$SANDBOX/python.log"
case "$1" in
--version) echo "Python 3.11.2" ;;
-m)
    if [[ ! -e $SANDBOX/installed-python3-venv ]]; then
        echo "The virtual environment was not created successfully because ensurepip is not available." >&2
        exit 1
    fi
    mkdir -p "${!#}/bin"
    cp "$SANDBOX/stubs/venv-python" "${!#}/bin/python"
    chmod +x "${!#}/bin/python"
    ;;
esac
"#;

/// Stands in for the venv's Python: logs its arguments (`-m pip install …`, `-c ''`).
const VENV_PYTHON: &str =
    "#!/usr/bin/env bash\necho \"venv-python $*\" >>\"$SANDBOX/python.log\"\n";

/// Stands in for the other programs of `scripts/test-tools`.
const PROGRAM: &str = "#!/usr/bin/env bash\nexit 0\n";

/// Answers `id -u` with `$FAKE_UID`.
const ID: &str = "#!/usr/bin/env bash\necho \"$FAKE_UID\"\n";

/// A copy of `scripts/` with a PATH of base programs and stand-ins.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Sandbox { dir };
        for sub in ["repo/scripts", "bin", "stubs", "pgbin", "pgshare/extension"] {
            std::fs::create_dir_all(s.path(sub)).expect("mkdir");
        }
        for f in ["prereqs", "test-tools", "requirements-test.txt"] {
            std::fs::copy(
                repo().join("scripts").join(f),
                s.path("repo/scripts").join(f),
            )
            .expect("copy scripts/");
        }
        for program in BASE_PROGRAMS {
            let real = find_on_path(program, &std::env::var_os("PATH").unwrap_or_default())
                .unwrap_or_else(|| panic!("{program} (a base program of Debian) not on PATH"));
            std::os::unix::fs::symlink(real, s.path("bin").join(program)).expect("symlink");
        }
        let mut packages = String::new();
        for spec in tool_specs() {
            let package = package(&spec);
            if spec.kind == ToolKind::PgExtension {
                packages.push_str(&format!("{package} {PG_EXTENSION_PREFIX}{}\n", spec.name));
                continue;
            }
            packages.push_str(&format!("{package} {}\n", spec.name));
            let stub = if spec.name == "python3" {
                PYTHON3
            } else {
                PROGRAM
            };
            s.write(&format!("stubs/{}", spec.name), stub);
        }
        s.write("pgbin/postgres", POSTGRES);
        s.write("pgbin/initdb", PROGRAM);
        s.write("pgbin/pg_config", PG_CONFIG);
        s.write("packages", &packages);
        s.write("stubs/venv-python", VENV_PYTHON);
        s.write("bin/apt-get", APT_GET);
        s.write("bin/id", ID);
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(rel);
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// Puts the stand-in of a line of `scripts/test-tools` in place: a program on the
    /// sandbox's PATH, an extension's control file in its server's share directory.
    fn install(&self, spec: &ToolSpec) {
        let text = match spec.kind {
            ToolKind::PgExtension => String::new(),
            ToolKind::Program => {
                std::fs::read_to_string(self.path(&format!("stubs/{}", spec.name))).expect("stub")
            }
        };
        self.write(&self.installed_path(spec), &text);
    }

    /// Where a line of `scripts/test-tools` is when installed, relative to the sandbox.
    fn installed_path(&self, spec: &ToolSpec) -> String {
        match spec.kind {
            ToolKind::PgExtension => format!("pgshare/extension/{}.control", spec.name),
            ToolKind::Program => format!("bin/{}", spec.name),
        }
    }

    /// `scripts/prereqs` with `args`, as uid `uid`.
    fn run(&self, uid: u32, args: &[&str]) -> Output {
        Command::new(self.path("repo/scripts/prereqs"))
            .args(args)
            .env_clear()
            .env("PATH", self.path("bin"))
            .env("DBX_PG_BINDIR", self.path("pgbin"))
            .env("SANDBOX", self.dir.path())
            .env("FAKE_UID", uid.to_string())
            .output()
            .expect("running scripts/prereqs")
    }

    /// A log of the stand-ins, empty when they did not run.
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn venv_python(&self) -> PathBuf {
        self.path("repo/target/pyenv/bin/python")
    }
}

/// The Debian package of a line of `scripts/test-tools` for the sandbox's server.
fn package(spec: &ToolSpec) -> String {
    spec.package_for(SANDBOX_PG_MAJOR)
}

/// Every Debian package of `scripts/test-tools`, sorted, as `scripts/prereqs` names them.
fn all_packages() -> String {
    let set: BTreeSet<String> = tool_specs().iter().map(package).collect();
    set.into_iter().collect::<Vec<_>>().join(" ")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn prereqs_as_a_user_names_each_missing_program_its_checks_and_the_install_command() {
    let sb = Sandbox::new();
    let out = sb.run(1000, &["--env"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    assert!(stdout.is_empty(), "no variables when failing: {stdout}");
    for spec in tool_specs() {
        let what = match spec.kind {
            ToolKind::Program => String::new(),
            ToolKind::PgExtension => format!("PostgreSQL {SANDBOX_PG_MAJOR} extension, "),
        };
        let line = format!(
            "  {} ({what}Debian package {}), needed by {}",
            spec.name,
            package(&spec),
            spec.needed_by
        );
        assert!(stderr.contains(&line), "{line:?} not in:\n{stderr}");
    }
    assert!(
        all_packages().contains(&format!("postgresql-{SANDBOX_PG_MAJOR}-postgis-3")),
        "the extension's package follows the server found: {}",
        all_packages()
    );
    assert!(stderr.contains("(not root)"), "{stderr}");
    let command = format!(
        "  sudo apt-get install -y --no-install-recommends {}\n",
        all_packages()
    );
    assert!(stderr.contains(&command), "{command:?} not in:\n{stderr}");
    assert!(sb.log("apt.log").is_empty() && !sb.venv_python().exists());
}

#[test]
fn prereqs_as_root_installs_the_missing_packages_and_makes_the_venv_once() {
    let sb = Sandbox::new();
    let expected_env = format!("export DBX_TEST_PYTHON={}\n", sb.venv_python().display());
    let runs = |sb: &Sandbox| {
        let out = sb.run(0, &["--env"]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stdout, expected_env, "{stderr}");
        stderr
    };
    runs(&sb);
    let apt = sb.log("apt.log");
    assert!(apt.lines().any(|l| l.ends_with(" update")), "{apt}");
    let install = format!("install --no-install-recommends {}", all_packages());
    assert!(apt.lines().any(|l| l.ends_with(&install)), "{apt}");
    for spec in tool_specs() {
        assert!(sb.path(&sb.installed_path(&spec)).is_file(), "{spec:?}");
    }
    let venv = sb.path("repo/target/pyenv");
    let made = format!("python3 -m venv --clear {}", venv.display());
    let pip = "venv-python -m pip install --quiet --disable-pip-version-check --no-input \
               --require-virtualenv -r scripts/requirements-test.txt";
    let count = |needle: &str| sb.log("python.log").matches(needle).count();
    assert_eq!(
        (count(&made), count(pip)),
        (1, 1),
        "{}",
        sb.log("python.log")
    );

    // Again: nothing to install, nothing to make, and nothing said.
    let stderr = runs(&sb);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(sb.log("apt.log"), apt);
    assert_eq!(
        (count(&made), count(pip)),
        (1, 1),
        "{}",
        sb.log("python.log")
    );

    // A changed requirements file makes the environment again.
    let req = sb.path("repo/scripts/requirements-test.txt");
    let mut text = std::fs::read_to_string(&req).expect("requirements");
    text.push_str("six==1.16.0\n");
    std::fs::write(&req, text).expect("write requirements");
    runs(&sb);
    assert_eq!(
        (count(&made), count(pip)),
        (2, 2),
        "{}",
        sb.log("python.log")
    );
    assert_eq!(sb.log("apt.log"), apt);
}

#[test]
fn prereqs_installs_python3_venv_when_python3_lacks_venv_and_asks_for_it_as_a_user() {
    let sb = Sandbox::new();
    for spec in tool_specs() {
        sb.install(&spec);
    }
    // As a user: the venv cannot be made; the message says what to install.
    let out = sb.run(1000, &[]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("ensurepip is not available"), "{stderr}");
    assert!(
        stderr.contains("sudo apt-get install -y --no-install-recommends python3-venv"),
        "{stderr}"
    );
    assert!(
        !sb.path("repo/target/pyenv").exists(),
        "a half-made venv is removed"
    );
    // As root: python3-venv is installed and the venv made.
    let out = sb.run(0, &[]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let apt = sb.log("apt.log");
    assert!(
        apt.lines()
            .any(|l| l.ends_with("install --no-install-recommends python3-venv")),
        "{apt}"
    );
    assert!(sb.venv_python().is_file());
}

#[test]
fn prereqs_installs_only_what_is_missing_a_program_or_an_extension() {
    for missing in ["postgis", "haproxy"] {
        let sb = Sandbox::new();
        let specs = tool_specs();
        for spec in specs.iter().filter(|s| s.name != missing) {
            sb.install(spec);
        }
        let out = sb.run(0, &[]);
        let (_, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let spec = specs.iter().find(|s| s.name == missing).expect("listed");
        let apt = sb.log("apt.log");
        let install = format!("install --no-install-recommends {}", package(spec));
        assert!(apt.lines().any(|l| l.ends_with(&install)), "{apt}");
        assert!(sb.path(&sb.installed_path(spec)).is_file());
        // Installed now: a second run does nothing.
        let out = sb.run(0, &[]);
        assert!(out.status.success());
        assert_eq!(sb.log("apt.log"), apt);
    }
}

#[test]
fn every_program_and_extension_of_scripts_test_tools_is_installed() {
    for spec in tool_specs() {
        match spec.kind {
            ToolKind::Program => tool(&spec.name),
            ToolKind::PgExtension => pg_extension(&spec.name),
        };
    }
}

#[test]
fn the_test_python_is_a_venv_with_the_pinned_packages_only() {
    let python = python();
    let pinned: Vec<(String, String)> = read("scripts/requirements-test.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, version) = l
                .split_once("==")
                .unwrap_or_else(|| panic!("scripts/requirements-test.txt: {l:?} is not pinned"));
            (name.trim().to_string(), version.trim().to_string())
        })
        .collect();
    assert!(pinned.iter().any(|(n, _)| n == "msgpack"), "{pinned:?}");
    for (name, version) in &pinned {
        let got = run_ok(Command::new(&python).args([
            "-c",
            &format!("import importlib.metadata as m; print(m.version({name:?}))"),
        ]));
        assert_eq!(got.trim(), version, "{name} in {}", python.display());
    }
    // A virtual environment that does not see the machine's own packages.
    let out = run_ok(Command::new(&python).args([
        "-c",
        "import sys, site; print(sys.prefix != sys.base_prefix, site.ENABLE_USER_SITE)",
    ]));
    assert_eq!(out.trim(), "True False", "{}", python.display());
    let cfg = python
        .parent()
        .and_then(Path::parent)
        .map(|venv| venv.join("pyvenv.cfg"))
        .expect("venv directory");
    let cfg = std::fs::read_to_string(&cfg).unwrap_or_else(|e| panic!("{}: {e}", cfg.display()));
    assert!(
        cfg.contains("include-system-site-packages = false"),
        "{cfg}"
    );
}

/// Programs started by name in a test source: the string literal a `Command::new` call
/// begins with.
fn programs_started_in(text: &str) -> Vec<String> {
    text.split("Command::new(\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(p, _)| p.to_string()))
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_program_a_test_starts_is_a_readme_prerequisite_or_in_scripts_test_tools() {
    // Programs of every Debian system (util-linux, coreutils) and PostgreSQL's (the README's
    // prerequisite); anything else must be in scripts/test-tools and found through
    // dbx_testkit::prereq::tool.
    let base = ["runuser", "chown"];
    let mut files = Vec::new();
    rust_files(&repo().join("tests"), &mut files);
    rust_files(&repo().join("crates/dbx-testkit/src"), &mut files);
    for krate in std::fs::read_dir(repo().join("crates")).expect("crates/") {
        let tests = krate.expect("dir entry").path().join("tests");
        if tests.is_dir() {
            rust_files(&tests, &mut files);
        }
    }
    assert!(files.len() > 20, "{files:?}");
    let mut found = BTreeSet::new();
    for f in &files {
        let src = std::fs::read_to_string(f).expect("read");
        for program in programs_started_in(&src) {
            assert!(
                base.contains(&program.as_str())
                    || program.starts_with("pg_")
                    || ["initdb", "postgres", "psql"].contains(&program.as_str()),
                "{} starts {program:?}: list it in scripts/test-tools (so scripts/test \
                 installs it) and start it with dbx_testkit::prereq::tool({program:?})",
                f.display()
            );
            found.insert(program);
        }
    }
    assert!(
        found.contains("runuser"),
        "the scan finds programs: {found:?}"
    );
    assert_eq!(
        programs_started_in("Command::new(\"a\").arg(\"x\"); tokio::process::Command::new(\"b\")"),
        ["a", "b"]
    );
}
