//! `completions` and `man`: the shell completion scripts and the manual
//! pages, generated from the same clap definition the parser uses, so they
//! never drift from the flags nixgold accepts.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, Failure};

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "nixgold", &mut std::io::stdout());
}

/// Writes `nixgold(1)` to stdout, or with `dir` one page per command
/// (`nixgold.1`, `nixgold-plan.1`, …) into `dir`.
pub fn man(dir: Option<&Path>) -> Result<(), Failure> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        std::io::stdout().write_all(&page)?;
        return Ok(());
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::Message(format!("cannot create {}: {e}", dir.display())))?;
    clap_mangen::generate_to(cmd, dir)
        .map_err(|e| Failure::Message(format!("cannot write pages into {}: {e}", dir.display())))
}
