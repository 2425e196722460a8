//! The log of a `download-url` task, as Proxmox writes it while the file
//! arrives. pve-common's `PVE::Tools::download_file_from_url` prints
//! "downloading URL to DEST", then runs `wget --progress=dot:giga -O
//! DEST.tmp.PID URL` under `run_command`, whose output lines become task log
//! lines; after wget, "calculating checksum...OK, checksum verified" and
//! "download of 'URL' to 'DEST' finished". In wget's giga dot style each dot
//! is 1 MiB, dots come in clusters of 8 and rows of 32 (the wget manual,
//! `--progress=dot:giga`), each row starting with its offset in KiB and
//! ending with the percentage done, the rate and the time left; the last
//! row ends with `100%`, the rate and `=` the total time.

/// Bytes per dot and per row of wget's giga style.
const DOT: u64 = 1 << 20;
const ROW: u64 = 32 * DOT;

/// The log of a download of `size` bytes from `url` to `dest` that has
/// received `done` bytes after `elapsed_ms` (wget's header, then a row per
/// 32 MiB received; the last, partial row once all has arrived).
pub fn log(url: &str, dest: &str, pid: u32, size: u64, done: u64, elapsed_ms: u64) -> Vec<String> {
    let done = done.min(size);
    let mut lines = vec![
        format!("downloading {url} to {dest}"),
        "HTTP request sent, awaiting response... 200 OK".to_owned(),
        format!(
            "Length: {size} ({}) [application/octet-stream]",
            human(size)
        ),
        format!("Saving to: '{dest}.tmp.{pid}'"),
        String::new(),
    ];
    // Bytes per second so far, and the seconds left at that rate.
    let rate = done * 1000 / elapsed_ms.max(1);
    let rows = if done == size {
        size.div_ceil(ROW)
    } else {
        done / ROW
    };
    for row in 0..rows {
        let start = row * ROW;
        let end = (start + ROW).min(size);
        let dots = (end - start).div_ceil(DOT) as usize;
        let clusters: Vec<String> = (0..dots)
            .collect::<Vec<_>>()
            .chunks(8)
            .map(|c| ".".repeat(c.len()))
            .collect();
        let percent = end * 100 / size.max(1);
        let tail = if end == size {
            format!("={}s", elapsed_ms.div_ceil(1000))
        } else {
            format!(" {}s", (size - end) / rate.max(1))
        };
        lines.push(format!(
            "{:>7}K {:<35} {percent:>3}% {}{tail}",
            start / 1024,
            clusters.join(" "),
            human(rate)
        ));
    }
    if done == size {
        lines.push(format!("'{dest}.tmp.{pid}' saved [{size}/{size}]"));
    }
    lines
}

/// wget's short sizes: `1.0G`, `412M`, `96K`.
fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b => format!("{}K", b >> 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_32_dots_in_clusters_of_8_with_percent_and_rate() {
        let size = 100 << 20;
        let half = log(
            "https://x/a.iso",
            "/var/lib/vz/template/iso/a.iso",
            7,
            size,
            70 << 20,
            1000,
        );
        assert_eq!(
            half[2],
            "Length: 104857600 (100M) [application/octet-stream]"
        );
        assert_eq!(half[3], "Saving to: '/var/lib/vz/template/iso/a.iso.tmp.7'");
        let rows: Vec<&String> = half.iter().skip(5).collect();
        assert_eq!(rows.len(), 2, "two whole rows of 32 MiB: {half:?}");
        assert_eq!(
            rows[1].as_str(),
            "  32768K ........ ........ ........ ........  64% 70M 0s"
        );
        let all = log(
            "https://x/a.iso",
            "/var/lib/vz/template/iso/a.iso",
            7,
            size,
            size,
            2000,
        );
        let last = &all[all.len() - 2];
        assert!(last.starts_with("  98304K ....    "), "{last}");
        assert!(last.ends_with("100% 50M=2s"), "{last}");
        assert_eq!(
            all.last().unwrap(),
            "'/var/lib/vz/template/iso/a.iso.tmp.7' saved [104857600/104857600]"
        );
    }
}
