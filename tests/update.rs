//! `nixgold update` against a channel server on 127.0.0.1 that behaves like
//! channels.nixos.org: `latest-nixos-minimal-<arch>.iso` redirects to the
//! current release, whose `.sha256` file names it; a new release moves the
//! redirect. The pin moves in the lockfile only when the release does, and
//! the images built from that ISO then need a new generation.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::Digest;

/// A channel server; `release` is the current point release.
struct Channels {
    url: String,
    release: Arc<AtomicU32>,
}

fn iso_name(release: u32) -> String {
    format!("nixos-minimal-24.05.{release}-x86_64-linux.iso")
}

fn sha_of(release: u32) -> String {
    sha2::Sha256::digest(iso_name(release).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn channels() -> Channels {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let release = Arc::new(AtomicU32::new(100));
    let (base, current) = (url.clone(), release.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let r = current.load(Ordering::SeqCst);
            let (status, headers, body) = match path.as_str() {
                "/nixos-24.05/latest-nixos-minimal-x86_64-linux.iso" => (
                    "302 Found",
                    format!(
                        "Location: {base}/releases/nixos-24.05.{r}/{}\r\n",
                        iso_name(r)
                    ),
                    String::new(),
                ),
                "/nixos-24.05/git-revision" => ("200 OK", String::new(), format!("abcdef{r:07}\n")),
                p if p.ends_with(".iso.sha256") => {
                    let file = p.rsplit('/').next().unwrap().trim_end_matches(".sha256");
                    match (100..=r).find(|n| iso_name(*n) == file) {
                        Some(n) => ("200 OK", String::new(), format!("{}  {file}\n", sha_of(n))),
                        None => ("404 Not Found", String::new(), String::new()),
                    }
                }
                _ => ("404 Not Found", String::new(), String::new()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Channels { url, release }
}

const FLEET: &str = r#"fleet: homelab
proxmox:
  endpoint: https://pve.example.invalid:8006
  nodes: [pve]
  token: { env: PROXMOX_VE_API_TOKEN }
isos:
  nixos: { channel: nixos-24.05 }
  fixed: { url: "https://example.org/fixed.iso", checksum: "sha256:3c5f7a9e1b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a" }
images:
  golden:
    iso: nixos
    vmid_range: { first: 9400, last: 9409 }
    hardware: { disk: 30G, storage: tank }
    nixos: { state_version: "24.05" }
  pinned:
    iso: fixed
    vmid_range: { first: 9410, last: 9419 }
    hardware: { disk: 30G, storage: tank }
    nixos: { state_version: "24.05" }
"#;

fn nixgold(dir: &std::path::Path, channels: &Channels, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nixgold"))
        .args(args)
        .current_dir(dir)
        .env("NIXGOLD_CHANNELS_URL", &channels.url)
        .env("NO_COLOR", "1")
        .env_remove("NIXGOLD_SIM")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn update_moves_a_pin_only_when_the_channel_has_a_new_release() {
    let ch = channels();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fleet.yaml"), FLEET).unwrap();
    let lock_path = dir.path().join("fleet.lock");
    std::fs::write(&lock_path, "version = 1\nfleet = \"homelab\"\n").unwrap();
    let lock = || std::fs::read_to_string(&lock_path).unwrap();

    // First run: the channel's current release is pinned.
    let (code, out, err) = nixgold(dir.path(), &ch, &["update", "fleet.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    let first = format!("{}/releases/nixos-24.05.100/{}", ch.url, iso_name(100));
    assert!(
        out.contains(&format!(
            "iso.nixos: pinned: {first} (sha256 {})",
            sha_of(100)
        )) && out.contains("iso.fixed: pinned by the fleet"),
        "{out}"
    );
    assert!(lock().contains(&first) && lock().contains(&sha_of(100)));

    // An image built from it: generation 1 with this ISO's checksum.
    let loaded = nixgold::fleet::load(&dir.path().join("fleet.yaml")).unwrap();
    let iso: nixgold::ids::Sha256 = sha_of(100).parse().unwrap();
    let inputs = nixgold::desired::input_hash("golden", &loaded.fleet.images["golden"], Some(&iso));
    std::fs::write(
        &lock_path,
        format!(
            "{}\n[image.golden]\ncurrent = 1\n\n[[image.golden.generation]]\nnumber = 1\ninput_hash = \"{inputs}\"\niso_sha256 = \"{}\"\nbuilt_at = \"2026-11-01T10:00:00Z\"\nnixos_version = \"24.05\"\nsystem_path = \"/nix/store/x\"\ntemplates = [{{ node = \"pve\", vmid = 9400 }}]\n",
            lock(),
            sha_of(100)
        ),
    )
    .unwrap();
    let (code, _, err) = nixgold(dir.path(), &ch, &["lock", "fleet.yaml"]);
    assert_eq!(code, 0, "{err}");

    // Nothing new upstream: nothing changes, byte for byte.
    let before = lock();
    let (code, out, _) = nixgold(dir.path(), &ch, &["update", "fleet.yaml", "--iso", "nixos"]);
    assert_eq!(code, 0);
    assert!(out.contains("iso.nixos: up to date"), "{out}");
    assert_eq!(lock(), before);

    // A new release: refused under --locked, recorded otherwise.
    ch.release.store(101, Ordering::SeqCst);
    let (code, _, err) = nixgold(dir.path(), &ch, &["update", "fleet.yaml", "--locked"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(lock(), before, "--locked changes nothing");
    let (code, out, err) = nixgold(dir.path(), &ch, &["update", "fleet.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("iso.nixos: moved\n    from {first}"))
            && out.contains(&iso_name(101)),
        "{out}"
    );
    assert!(
        lock().contains(&format!("{}/releases/nixos-24.05.101/", ch.url))
            && lock().contains(&sha_of(101)),
        "{}",
        lock()
    );
    assert!(
        err.contains("`nixgold plan` shows the new generations"),
        "{err}"
    );

    // The image now needs a new generation, because of the ISO.
    let (code, graph, err) = nixgold(dir.path(), &ch, &["graph", "fleet.yaml", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        graph.contains("\"build_reason\": \"the pinned ISO changed\""),
        "{graph}"
    );

    let (code, _, err) = nixgold(dir.path(), &ch, &["update", "fleet.yaml", "--iso", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--iso nope: the fleet has no such ISO"),
        "{err}"
    );
}
