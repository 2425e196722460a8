//! `nixgold sim serve`: the Proxmox VE simulator as a standalone server, for
//! other clients (proxmoxer, curl, a terraform provider) and for trying a
//! fleet without a cluster.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use pve_sim::{ClusterSpec, Credentials, FaultRule, RemoteFile, SimOptions, Simulator};

use super::Failure;

#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Serve the simulated Proxmox VE API until interrupted.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8006")]
    listen: String,
    /// Keep the cluster's state in this file (created if missing).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// The simulated cluster (JSON: nodes, storages, bridges, VMs); the
    /// default has node `pve`, storages `local`, `local-lvm`, `tank`.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// The API token to accept, `user@realm!id=secret` (default: a new one).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// A user for ticket logins, `user@realm:password` (repeatable).
    #[arg(long, value_name = "USER:PASSWORD")]
    user: Vec<String>,
    /// Serve HTTPS with a fresh self-signed certificate.
    #[arg(long)]
    tls: bool,
    /// With --tls: write the certificate (PEM) here, to use as a CA file.
    #[arg(long, value_name = "FILE", requires = "tls")]
    cert_out: Option<PathBuf>,
    /// One-way network latency per request, in ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    latency: u64,
    /// Requests served at once.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Time each request takes to serve, in ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    service_time: u64,
    /// Duration of a task type, `qmclone=1500` (repeatable).
    #[arg(long, value_name = "TYPE=MS")]
    task_time: Vec<String>,
    /// Fast mode for tests: tasks take 50 ms, short lock waits, no 401 delay.
    #[arg(long)]
    fast: bool,
    /// A fault rule, `METHOD PATH => ACTION[*COUNT][@RATE]` (repeatable);
    /// actions: 500/595/596/599, drop, slow:MS, lock-timeout,
    /// task-fail[:MSG], task-hang, agent-not-running, wrong-key (sendkey).
    #[arg(long, value_name = "RULE")]
    fault: Vec<String>,
    /// Port a guest's SSH server listens on at an address given to it with
    /// `ip addr` (a static build address); 22 needs root.
    #[arg(long, value_name = "PORT", default_value_t = 22)]
    guest_ssh_port: u16,
    /// A file `download-url` can fetch, `URL=SHA256:BYTES` (repeatable).
    #[arg(long, value_name = "URL=SHA256:BYTES")]
    remote_file: Vec<String>,
}

pub fn run(command: &SimCommand) -> Result<(), Failure> {
    let SimCommand::Serve(args) = command;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::from)?;
    runtime.block_on(serve(args))
}

fn bad(flag: &str, value: &str, why: &str) -> Failure {
    Failure::Message(format!("--{flag} {value:?}: {why}"))
}

fn options(args: &ServeArgs) -> Result<SimOptions, Failure> {
    let mut opts = if args.fast {
        SimOptions::fast(Duration::from_millis(50))
    } else {
        SimOptions::default()
    };
    opts.latency = Duration::from_millis(args.latency);
    opts.workers = args.workers.max(1);
    opts.service_time = Duration::from_millis(args.service_time);
    opts.guest_ssh_port = args.guest_ssh_port;
    for t in &args.task_time {
        let (kind, ms) = t
            .split_once('=')
            .and_then(|(k, ms)| Some((k, ms.parse::<u64>().ok()?)))
            .ok_or_else(|| bad("task-time", t, "write TYPE=MS, e.g. qmclone=1500"))?;
        opts.task_durations
            .insert(kind.to_owned(), Duration::from_millis(ms));
    }
    for f in &args.fault {
        let rule: FaultRule = f.parse().map_err(|e: String| bad("fault", f, &e))?;
        opts.faults.add(rule);
    }
    for r in &args.remote_file {
        let parsed = r.rsplit_once('=').and_then(|(url, rest)| {
            let (sha, size) = rest.split_once(':')?;
            Some((url, sha, size.parse::<u64>().ok()?))
        });
        let (url, sha256, size) =
            parsed.ok_or_else(|| bad("remote-file", r, "write URL=SHA256:BYTES"))?;
        opts.remote_files.insert(
            url.to_owned(),
            RemoteFile {
                sha256: sha256.to_ascii_lowercase(),
                size,
            },
        );
    }
    Ok(opts)
}

fn credentials(args: &ServeArgs) -> Result<(Credentials, String), Failure> {
    let token = args.token.clone().unwrap_or_else(|| {
        let secret: [u8; 16] = rand::random();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "root@pam!nixgold={}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    });
    let mut creds = Credentials::token(&token).map_err(Failure::Message)?;
    for u in &args.user {
        let (user, password) = u
            .split_once(':')
            .filter(|(user, _)| user.contains('@'))
            .ok_or_else(|| bad("user", "…", "write user@realm:password"))?;
        creds = creds.with_user(user, password);
    }
    Ok((creds, token))
}

async fn serve(args: &ServeArgs) -> Result<(), Failure> {
    let spec = match &args.cluster {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Message(format!("cannot read {}: {e}", path.display())))?;
            serde_json::from_str::<ClusterSpec>(&text).map_err(|e| {
                Failure::Message(format!(
                    "{}: not a cluster description: {e}",
                    path.display()
                ))
            })?
        }
        None => ClusterSpec::default(),
    };
    let opts = options(args)?;
    let (creds, token) = credentials(args)?;
    let sim = match &args.state {
        Some(path) => Simulator::persistent(path, spec, opts, creds).map_err(Failure::from)?,
        None => Simulator::new(spec, opts, creds),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| Failure::Message(format!("cannot listen on {}: {e}", args.listen)))?;
    let handle = if args.tls {
        sim.serve_tls(listener).map_err(Failure::Message)?
    } else {
        sim.serve(listener)
    };
    println!(
        "nixgold sim: a simulated Proxmox VE {} cluster",
        pve_sim::RELEASE
    );
    println!("endpoint: {}", handle.url());
    println!("token: {token}");
    if let Some(cert) = &handle.certificate {
        println!("fingerprint: {}", cert.fingerprint);
        if let Some(path) = &args.cert_out {
            std::fs::write(path, &cert.pem)
                .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))?;
            println!("certificate: {}", path.display());
        }
    }
    if let Some(path) = &args.state {
        println!("state: {}", path.display());
    }
    println!("press Ctrl-C to stop");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    tokio::signal::ctrl_c().await.map_err(Failure::from)?;
    handle.shutdown().await;
    Ok(())
}
