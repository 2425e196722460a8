//! An ISO download's progress, read from its Proxmox task log. Proxmox's
//! `download-url` worker (`PVE::Tools::download_file_from_url` in
//! pve-common) runs `wget --progress=dot:giga`, whose output is the task
//! log: a `Length: BYTES (…)` line, then one row per 32 MiB received —
//! `OFFSETK` and up to 32 dots of 1 MiB, then the percentage. Rows are
//! what there is to report; a log without them (the file was there already)
//! reports nothing.

/// Follows a download's log lines and says how far it got.
#[derive(Debug, Default)]
pub struct DownloadProgress {
    length: Option<u64>,
}

impl DownloadProgress {
    /// Reads one log line; a wget progress row gives `412M of 1.0G (41%)`.
    pub fn feed(&mut self, line: &str) -> Option<String> {
        if let Some(rest) = line.strip_prefix("Length: ") {
            self.length = rest.split_whitespace().next()?.parse().ok();
            return None;
        }
        let mut words = line.split_whitespace();
        let offset_kib: u64 = words.next()?.strip_suffix('K')?.parse().ok()?;
        let mut dots = 0u64;
        let mut percent = None;
        for word in words {
            if word.chars().all(|c| c == '.') {
                dots += word.len() as u64;
            } else {
                percent = word.strip_suffix('%')?.parse::<u8>().ok();
                break;
            }
        }
        let percent = percent?;
        let done = (offset_kib << 10) + (dots << 20);
        let done = self.length.map_or(done, |l| done.min(l));
        Some(match self.length {
            Some(length) => format!("{} of {} ({percent}%)", size(done), size(length)),
            None => format!("{} ({percent}%)", size(done)),
        })
    }
}

/// `412M`, `1.0G`.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1}G", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{}M", bytes >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wget_rows_become_bytes_and_percent() {
        let mut p = DownloadProgress::default();
        assert_eq!(
            p.feed("downloading https://x/a.iso to /var/lib/vz/template/iso/a.iso"),
            None
        );
        assert_eq!(
            p.feed("Length: 1073741824 (1.0G) [application/octet-stream]"),
            None
        );
        assert_eq!(
            p.feed("  32768K ........ ........ ........ ........   6% 50M 19s")
                .as_deref(),
            Some("64M of 1.0G (6%)")
        );
        assert_eq!(
            p.feed("1015808K ........ ........ ........ ........ 100% 60M=17s")
                .as_deref(),
            Some("1.0G of 1.0G (100%)")
        );
        assert_eq!(p.feed("calculating checksum...OK, checksum verified"), None);
        assert_eq!(
            p.feed("OK, got correct file already, no need to download"),
            None
        );
    }
}
