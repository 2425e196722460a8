//! The command line's conventions: completion scripts and manual pages
//! generate from the parser's definition, and a command line nixgold cannot
//! parse exits 64 (`EX_USAGE`), never 0 or 2, which scripts read as "no
//! changes" and "changes".

mod common;

use common::{nixgold, run};

#[test]
fn completions_generate_for_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "complete -F _nixgold"),
        ("zsh", "#compdef nixgold"),
        ("fish", "complete -c nixgold"),
    ] {
        let (code, out, err) = run(nixgold(dir.path()).args(["completions", shell]));
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: {out}");
        for word in ["plan", "apply", "drift", "detailed-exitcode", "prometheus"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, _, err) = run(nixgold(dir.path()).args(["completions", "tcsh"]));
    assert_eq!(code, 64, "{err}");
}

#[test]
fn the_man_page_generates_to_stdout_and_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(nixgold(dir.path()).arg("man"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(".TH nixgold 1"), "{out}");
    assert!(
        out.contains("\\-\\-sim"),
        "the global flags are documented: {out}"
    );
    let pages = dir.path().join("man");
    let (code, _, err) = run(nixgold(dir.path()).args(["man", "--dir", "man"]));
    assert_eq!(code, 0, "{err}");
    let plan = std::fs::read_to_string(pages.join("nixgold-plan.1")).unwrap();
    assert!(plan.contains("detailed\\-exitcode"), "{plan}");
}

#[test]
fn usage_errors_exit_64_not_0_or_2() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(nixgold(dir.path()).args(["drift", "--prometeus", "x"]));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("a similar argument exists: '--prometheus'"),
        "{err}"
    );
    let (code, _, _) = run(nixgold(dir.path()).arg("frobnicate"));
    assert_eq!(code, 64);
    let (code, out, _) = run(nixgold(dir.path()).arg("--help"));
    assert_eq!(code, 0, "help is not an error");
    assert!(out.contains("Usage: nixgold"), "{out}");
}
