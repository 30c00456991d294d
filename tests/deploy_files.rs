//! The shipped deployment files are valid as shipped: every HAProxy
//! configuration passes `haproxy -c` (HAProxy from Debian, installed by
//! tests/run.sh), and the container, Kubernetes and Grafana files parse.
//! These are offline checks; tests/haproxy.rs runs the configurations.

mod lb;

use std::path::{Path, PathBuf};
use std::process::Command;

use lb::haproxy_bin;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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
