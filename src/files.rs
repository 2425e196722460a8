//! Writing the files nixgold produces (lockfile, saved plans, Prometheus
//! textfiles): atomically (a temp file beside the target, synced, renamed
//! over it), and with the mode a reader expects — a rewritten file keeps
//! its mode, a new one is 0644 (none of these files holds a secret).

use std::io::Write;
use std::path::Path;

/// Mode of a new file: readable by node_exporter, CI and colleagues.
#[cfg(unix)]
const NEW_FILE_MODE: u32 = 0o644;

/// Replaces `path` with `text` atomically; `prefix` names the temp file.
pub fn write_atomic(path: &Path, text: &str, prefix: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(prefix).tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = match std::fs::metadata(path) {
            Ok(existing) => existing.permissions().mode() & 0o7777,
            Err(_) => NEW_FILE_MODE,
        };
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    tmp.persist(path).map(|_| ()).map_err(|e| e.error)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn new_files_are_0644_and_rewritten_ones_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.prom");
        write_atomic(&path, "a 1\n", ".t.").unwrap();
        assert_eq!(mode(&path), 0o644);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, "a 2\n", ".t.").unwrap();
        assert_eq!(mode(&path), 0o640);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
    }
}
