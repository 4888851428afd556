//! `seeds TARGET DIR`: writes TARGET's seeds (valid inputs built by `snapctl::fuzzing::seeds`)
//! into DIR, to start a corpus from. `seeds --list` prints the targets.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [l] if l == "--list" => {
            for (name, _) in snapctl::fuzzing::TARGETS {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        [target, dir] if snapctl::fuzzing::target(target).is_some() => {
            let dir = PathBuf::from(dir);
            if let Err(e) = std::fs::create_dir_all(&dir) {
                eprintln!("seeds: {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
            for (name, bytes) in snapctl::fuzzing::seeds::of(target) {
                let path = dir.join(format!("seed-{name}"));
                if let Err(e) = std::fs::write(&path, bytes) {
                    eprintln!("seeds: {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: seeds TARGET DIR | seeds --list");
            ExitCode::from(2)
        }
    }
}
