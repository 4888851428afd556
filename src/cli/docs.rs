//! Man pages and shell completions, generated from the clap definitions.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

use super::args::{Cli, AFTER_HELP};
use crate::error::{Error, Result};

/// Writes man/ and completions/ under `dir` from the clap definitions.
pub fn generate_docs(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let comp = dir.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d.display().to_string(), e))?;
    }
    let mut cmd = Cli::command();
    cmd.build(); // propagates the global options into every subcommand's page
    let write = |p: PathBuf, bytes: Vec<u8>| -> Result<()> {
        std::fs::write(&p, bytes).map_err(|e| Error::io(p.display().to_string(), e))
    };
    let render = |c: clap::Command| -> Result<Vec<u8>> {
        let mut v = Vec::new();
        clap_mangen::Man::new(c)
            .date("")
            .render(&mut v)
            .map_err(|e| Error::io("man page", e))?;
        Ok(v)
    };
    write(man.join("snapctl.1"), render(cmd.clone())?)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("snapctl-{}", sub.get_name());
        let c = sub.clone().name(name.clone()).after_long_help(AFTER_HELP);
        write(man.join(format!("{name}.1")), render(c)?)?;
    }
    for (shell, file) in [
        (clap_complete::Shell::Bash, "snapctl.bash"),
        (clap_complete::Shell::Zsh, "_snapctl"),
        (clap_complete::Shell::Fish, "snapctl.fish"),
    ] {
        let mut v = Vec::new();
        let mut c = Cli::command();
        clap_complete::generate(shell, &mut c, "snapctl", &mut v);
        write(comp.join(file), v)?;
    }
    Ok(())
}
