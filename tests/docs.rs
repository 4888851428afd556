//! man/ and completions/ are generated from the clap definitions; the committed copies must be
//! what the current code generates (run scripts/gen-docs.sh after changing a flag).

use std::path::Path;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn committed_man_pages_and_completions_are_current() {
    let tmp = tempfile::tempdir().unwrap();
    snapctl::cli::generate_docs(tmp.path()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for d in ["man", "completions"] {
        let want = files(&tmp.path().join(d));
        let have = files(&root.join(d));
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&have),
            names(&want),
            "{d}/ is stale: run scripts/gen-docs.sh"
        );
        for ((n, a), (_, b)) in have.iter().zip(&want) {
            assert!(a == b, "{d}/{n} is stale: run scripts/gen-docs.sh");
        }
    }
}

#[test]
fn every_subcommand_has_a_man_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in [
        "init", "info", "create", "list", "show", "rename", "delete", "export", "write", "check",
    ] {
        assert!(
            root.join(format!("man/snapctl-{sub}.1")).exists(),
            "no man page for {sub}"
        );
    }
}
