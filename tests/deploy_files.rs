//! The shipped deployment files are valid as shipped: every HAProxy
//! configuration passes `haproxy -c` (HAProxy from Debian, installed by
//! tests/run.sh), and the container, Kubernetes and Grafana files parse.
//! These are offline checks; tests/haproxy.rs runs the configurations.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The haproxy binary: on PATH, else Debian's /usr/sbin (not on a user's PATH).
pub fn haproxy_bin() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/usr/local/sbin"]) {
        let p = Path::new(dir).join("haproxy");
        if p.is_file() {
            return p;
        }
    }
    panic!("haproxy is not installed: `apt-get install haproxy` (tests/run.sh installs it)");
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        panic!("cannot read {}", dir.display());
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_with_ext(&p, ext));
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn every_haproxy_configuration_passes_haproxy_check() {
    let bin = haproxy_bin();
    let mut files = files_with_ext(&root().join("haproxy"), "cfg");
    files.extend(files_with_ext(&root().join("deploy"), "cfg"));
    let names: Vec<String> =
        files.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into()).collect();
    for expected in ["full-sync.cfg", "dynsec-sync.cfg"] {
        assert!(names.iter().any(|n| n == expected), "haproxy/{expected} is missing (found {names:?})");
    }
    for f in &files {
        let out = Command::new(&bin).arg("-c").arg("-f").arg(f).output();
        let out = match out {
            Ok(o) => o,
            Err(e) => panic!("run {} -c: {e}", bin.display()),
        };
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "haproxy -c -f {} failed:\n{text}", f.display());
        // A warning usually means a misspelt or ignored keyword.
        assert!(!text.contains("[WARNING]"), "haproxy -c -f {} warns:\n{text}", f.display());
    }
}
