//! Scenario tests of plan and apply: a fleet, a starting simulator state
//! and a lockfile in, the expected plan out — then apply, and planning
//! again must be empty. The real binary runs against the simulator on
//! 127.0.0.1 over HTTP, as it would against Proxmox.
//!
//! The starting state holds a built generation 1 of image `golden`
//! (template VMID 9400, stamped), as a template build leaves it.

use std::process::Command;
use std::time::Duration;

use pve_sim::cluster::VmSpec;
use pve_sim::{ClusterSpec, Credentials, RemoteFile, ServerHandle, SimOptions, Simulator};

const TOKEN: &str = "root@pam!nixgold=scenario-token-0001";
const PASSWORD: &str = "correct-horse-battery";
const ISO_URL: &str = "https://releases.example.org/nixos-minimal-24.05-x86_64-linux.iso";
const ISO_SHA: &str = "3c5f7a9e1b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a";

struct Scenario {
    rt: tokio::runtime::Runtime,
    sim: Simulator,
    handle: Option<ServerHandle>,
    dir: tempfile::TempDir,
}

fn template(vmid: u32, node: &str, image: &str, generation: u32, storage: &str) -> VmSpec {
    let config = [
        ("name", format!("{image}-g{generation}")),
        ("memory", "2048".into()),
        ("cores", "2".into()),
        ("scsi0", format!("{storage}:30")),
        ("ide2", format!("{storage}:cloudinit")),
        ("net0", "virtio,bridge=vmbr0".into()),
        ("agent", "1".into()),
        ("boot", "order=scsi0".into()),
        (
            "description",
            format!("nixgold: fleet=homelab resource=image.{image} generation={generation}"),
        ),
    ];
    VmSpec {
        vmid,
        node: node.into(),
        config: config.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        template: true,
        running: false,
    }
}

/// (image, generation, [(node, template VMID)]).
type LockedGeneration<'a> = (&'a str, u32, &'a [(&'a str, u32)]);

/// A lockfile naming built generations of `fleet`'s images, with the input
/// hashes those images really have (as a build would have recorded them).
fn lock_with(fleet: &str, generations: &[LockedGeneration]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.yaml");
    std::fs::write(&path, fleet).unwrap();
    let loaded = nixgold::fleet::load(&path).unwrap();
    let iso: nixgold::ids::Sha256 = ISO_SHA.parse().unwrap();
    let mut out = String::from("version = 1\nfleet = \"homelab\"\n");
    for (image, generation, replicas) in generations {
        let sha = nixgold::desired::input_hash(image, &loaded.fleet.images[*image], Some(&iso));
        let templates: Vec<String> = replicas
            .iter()
            .map(|(node, vmid)| format!("{{ node = \"{node}\", vmid = {vmid} }}"))
            .collect();
        out.push_str(&format!(
            "\n[image.{image}]\ncurrent = {generation}\n\n[[image.{image}.generation]]\nnumber = {generation}\ninput_hash = \"{sha}\"\niso_sha256 = \"{ISO_SHA}\"\nbuilt_at = \"2026-11-01T10:00:00Z\"\nnixos_version = \"24.05\"\nsystem_path = \"/nix/store/x\"\ntemplates = [{}]\n",
            templates.join(", ")
        ));
    }
    out
}

fn base_fleet(vms: &str) -> String {
    format!(
        r#"fleet: homelab
proxmox:
  endpoint: https://pve.example.invalid:8006
  nodes: [pve]
  token: {{ env: PROXMOX_VE_API_TOKEN }}
vm_vmid_range: {{ first: 1000, last: 1099 }}
isos:
  nixos: {{ url: "{ISO_URL}", checksum: "sha256:{ISO_SHA}" }}
images:
  golden:
    iso: nixos
    vmid_range: {{ first: 9400, last: 9409 }}
    hardware: {{ disk: 30G, storage: tank }}
    nixos: {{ state_version: "24.05" }}
vms:
{vms}"#
    )
}

const WEB_01: &str = r#"  web-01:
    image: golden
    vmid: 400
    cores: 2
    memory: 2048
    network: { ip: 192.168.1.130/24, gateway: 192.168.1.1, dns: [8.8.8.8, 1.1.1.1] }
    user: ops
    ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBv1gqDtmCvSeHXJbcQDJpVzRo3CqIxmg5iwJe2KsF1a ops@example"]
    password: { env: WEB_PASSWORD }
    tags: [prod]
    onboot: true
"#;

fn options() -> SimOptions {
    let mut o = SimOptions::fast(Duration::from_millis(20));
    o.remote_files.insert(
        ISO_URL.into(),
        RemoteFile {
            sha256: ISO_SHA.into(),
            size: 1 << 30,
        },
    );
    o
}

impl Scenario {
    fn new(cluster: ClusterSpec, fleet: &str, lock: &str) -> Self {
        Self::with_options(cluster, fleet, lock, options())
    }

    fn with_options(cluster: ClusterSpec, fleet: &str, lock: &str, opts: SimOptions) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sim = Simulator::new(cluster, opts, Credentials::token(TOKEN).unwrap());
        let handle = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            sim.serve(listener)
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fleet.yaml"), fleet).unwrap();
        std::fs::write(dir.path().join("fleet.lock"), lock).unwrap();
        Scenario {
            rt,
            sim,
            handle: Some(handle),
            dir,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixgold"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("PROXMOX_VE_ENDPOINT", self.handle.as_ref().unwrap().url())
            .env("PROXMOX_VE_API_TOKEN", TOKEN)
            .env("WEB_PASSWORD", PASSWORD)
            .env("NO_COLOR", "1")
            .env_remove("NIXGOLD_SIM")
            .env_remove("NIXGOLD_LOG");
        cmd
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.finish(&mut self.command(args))
    }

    /// Runs `cmd`; (exit code, stdout, stderr), checked for leaked secrets.
    fn finish(&self, cmd: &mut Command) -> (i32, String, String) {
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        for text in [&stdout, &stderr] {
            assert!(!text.contains(PASSWORD), "the password leaked:\n{text}");
            assert!(
                !text.contains("scenario-token-0001"),
                "the token leaked:\n{text}"
            );
        }
        (out.status.code().unwrap_or(-1), stdout, stderr)
    }

    fn plan(&self) -> (i32, String) {
        let (code, stdout, stderr) = self.run(&["plan", "fleet.yaml", "--detailed-exitcode"]);
        assert!(
            code == 0 || code == 2,
            "plan failed ({code}):\n{stdout}\n{stderr}"
        );
        (code, stdout)
    }

    /// Applies the fleet, checking the plan's DAG on the way (see
    /// [`Scenario::plan_dag`] and [`assert_starts_follow`]): every apply of
    /// the suite that goes through here is such a walk.
    fn apply(&self) -> String {
        let dag = self.plan_dag();
        let (code, stdout, stderr) = self.run(&["apply", "fleet.yaml", "--auto-approve"]);
        assert_eq!(code, 0, "apply failed:\n{stdout}\n{stderr}");
        assert_starts_follow(&dag, &stderr);
        stdout
    }

    /// The plan's changes in order with what each depends on (`plan
    /// --json`), after checking that the text plan and `graph --plan` list
    /// the same changes in the same order.
    fn plan_dag(&self) -> Vec<(String, Vec<String>)> {
        let (code, json, err) = self.run(&["plan", "fleet.yaml", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let dag: Vec<(String, Vec<String>)> = v["resource_changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let deps = c["nixgold"]["depends_on"].as_array().unwrap();
                let deps = deps.iter().map(|d| d.as_str().unwrap().to_owned());
                (c["address"].as_str().unwrap().to_owned(), deps.collect())
            })
            .collect();
        let order: Vec<&str> = dag.iter().map(|(a, _)| a.as_str()).collect();
        let (_, text) = self.plan();
        let verbs = [
            " will be created",
            " will be updated in place",
            " must be replaced",
            " will be destroyed",
        ];
        let shown: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("  # "))
            .filter_map(|l| verbs.iter().find_map(|v| l.strip_suffix(v)))
            .collect();
        assert_eq!(shown, order, "the text plan's order:\n{text}");
        let (_, graph, _) = self.run(&["graph", "--plan", "--format", "text", "fleet.yaml"]);
        let drawn: Vec<&str> = graph
            .lines()
            .filter_map(|l| l.strip_prefix("   "))
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest))
            .map(|l| l.split(" (after ").next().unwrap_or(l))
            .collect();
        assert_eq!(drawn, order, "graph --plan's order:\n{graph}");
        dag
    }

    /// Apply, then assert that planning again changes nothing.
    fn converge(&self) {
        self.apply();
        let (code, text) = self.plan();
        assert_eq!(code, 0, "not converged after apply:\n{text}");
        assert!(text.starts_with("No changes."), "{text}");
    }

    fn set_fleet(&self, text: &str) {
        std::fs::write(self.dir.path().join("fleet.yaml"), text).unwrap();
    }

    /// Adds a simulator fault rule (`METHOD PATH => ACTION…`).
    fn fault(&self, rule: &str) {
        self.sim.options().faults.add(rule.parse().unwrap());
    }

    /// Rewrites the fleet file with `edit`.
    fn edit_fleet(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("fleet.yaml");
        std::fs::write(&path, edit(std::fs::read_to_string(&path).unwrap())).unwrap();
    }

    fn config(&self, vmid: u32) -> std::collections::BTreeMap<String, String> {
        self.sim.inspect(|s| s.vms[&vmid].config.values.clone())
    }

    fn api(&self, method: &str, path: &str, form: &[(&str, &str)]) {
        let url = format!("{}/api2/json{path}", self.handle.as_ref().unwrap().url());
        self.rt.block_on(async {
            let c = reqwest::Client::new();
            let req = match method {
                "PUT" => c.put(url).form(form),
                _ => c.post(url).form(form),
            };
            let r = req
                .header("Authorization", format!("PVEAPIToken={TOKEN}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        });
    }
}

impl Scenario {
    /// Waits until the simulator has seen a request whose route ends with
    /// `suffix`.
    fn wait_for_request(&self, suffix: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.sim.journal().iter().any(|e| e.route.ends_with(suffix)) {
            assert!(
                std::time::Instant::now() < deadline,
                "apply never sent {suffix}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs apply with a start task that hangs, kills nixgold while it
    /// waits for it, and stops the hung task (as an operator would).
    /// Returns the killed process's id.
    fn apply_killed_while_starting(&self) -> u32 {
        self.fault("POST /nodes/*/qemu/*/status/start => task-hang*1");
        let mut child = self
            .command(&["apply", "fleet.yaml", "--auto-approve"])
            .spawn()
            .unwrap();
        self.wait_for_request("/status/start");
        child.kill().unwrap();
        let _ = child.wait();
        self.stop_running_task("qmstart");
        child.id()
    }

    /// Stops a still running task of `kind` through the API.
    fn stop_running_task(&self, kind: &str) {
        let upid = self.sim.inspect(|st| {
            st.tasks
                .values()
                .find(|t| t.kind == kind && t.exitstatus.is_none())
                .map(|t| t.upid.clone())
        });
        if let Some(upid) = upid {
            let path = format!("/nodes/pve/tasks/{}", percent(&upid));
            let url = format!("{}/api2/json{path}", self.handle.as_ref().unwrap().url());
            self.rt.block_on(async {
                reqwest::Client::new()
                    .delete(url)
                    .header("Authorization", format!("PVEAPIToken={TOKEN}"))
                    .send()
                    .await
                    .unwrap();
            });
        }
    }

    /// The apply lock's comment (the pool `nixgold-lock-homelab`), if held.
    fn lock_comment(&self) -> Option<String> {
        self.sim.inspect(|st| {
            st.pools
                .get("nixgold-lock-homelab")
                .map(|p| p.comment.clone().unwrap_or_default())
        })
    }

    /// The ID of the apply lock held now.
    fn lock_id(&self) -> String {
        let comment = self.lock_comment().expect("the fleet is locked");
        let id = comment
            .split_whitespace()
            .find_map(|w| w.strip_prefix("id="));
        id.expect("a lock ID").to_owned()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}

fn single_node() -> ClusterSpec {
    let mut spec = ClusterSpec::default();
    spec.vms.push(template(9400, "pve", "golden", 1, "tank"));
    spec
}

/// `cluster` plus a running VM `someone-elses` that nixgold does not own.
fn with_foreign_vm(mut cluster: ClusterSpec, vmid: u32) -> ClusterSpec {
    cluster.vms.push(VmSpec {
        vmid,
        node: "pve".into(),
        config: [("name".to_owned(), "someone-elses".to_owned())]
            .into_iter()
            .collect(),
        template: false,
        running: true,
    });
    cluster
}

fn golden_lock() -> String {
    lock_with(&base_fleet(WEB_01), &[("golden", 1, &[("pve", 9400)])])
}

#[test]
fn an_iso_download_reports_bytes_and_percent_from_the_task_log() {
    // Proxmox's download-url worker logs wget's `--progress=dot:giga` rows
    // (pve-common PVE/Tools.pm, download_file_from_url); the simulator
    // writes them as the file arrives, and apply reports them.
    let mut opts = options();
    opts.task_durations
        .insert("download".into(), Duration::from_millis(2500));
    let s = Scenario::with_options(single_node(), &base_fleet(WEB_01), &golden_lock(), opts);
    let (code, _, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{err}");
    let reports: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("iso.nixos[pve]: ") && l.contains(" of 1.0G ("))
        .collect();
    assert!(!reports.is_empty(), "no download progress in:\n{err}");
    let percents: Vec<u32> = reports
        .iter()
        .filter_map(|l| l.rsplit('(').next()?.strip_suffix("%)")?.parse().ok())
        .collect();
    assert_eq!(percents.len(), reports.len(), "{reports:?}");
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{reports:?}");
    assert!(
        percents.iter().any(|p| *p < 100),
        "progress before the end: {reports:?}"
    );
    let log = s.sim.inspect(|st| {
        st.tasks
            .values()
            .find(|t| t.kind == "download")
            .map(|t| t.log.clone())
            .unwrap_or_default()
    });
    assert!(log[0].starts_with("downloading https://"), "{log:?}");
    assert!(
        log.iter()
            .any(|l| l.ends_with("saved [1073741824/1073741824]")),
        "{log:?}"
    );
    assert_eq!(log.last().map(String::as_str), Some("TASK OK"));
}

#[test]
fn an_empty_cluster_gets_the_iso_and_the_vm_and_then_plans_empty() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    insta::assert_snapshot!("empty_cluster_plan", text);
    assert_contains(
        &text,
        &[
            "+ iso.nixos[pve]",
            "+ vm.web-01",
            "cipassword",
            "(sensitive)",
            "Plan: 2 to create, 0 to update, 0 to replace, 0 to destroy.",
        ],
    );
    s.converge();
    let c = s.config(400);
    assert_eq!(c["ipconfig0"], "ip=192.168.1.130/24,gw=192.168.1.1");
    assert_eq!(c["tags"], "nixgold;nixgold.homelab;prod");
    assert_eq!(c["cipassword"], PASSWORD, "the password reached Proxmox");
    assert!(c["description"].ends_with("resource=vm.web-01 image=golden generation=1"));
    assert!(s.sim.inspect(|st| st.vms[&400].running));
    // Apply on a converged fleet: nothing to do.
    let out = s.apply();
    assert!(out.starts_with("No changes."), "{out}");
}

#[test]
fn in_place_updates_memory_disk_and_cloud_init_address() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    s.converge();
    let changed = WEB_01
        .replace("memory: 2048", "memory: 4096\n    disk: 40G")
        .replace("192.168.1.130/24", "192.168.1.131/24");
    s.set_fleet(&base_fleet(&changed));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    insta::assert_snapshot!("update_in_place_plan", text);
    assert_contains(
        &text,
        &[
            "~ vm.web-01",
            "~ memory    = 2048 -> 4096",
            "~ disk",
            "\"30G\" -> \"40G\"",
            "needs a reboot",
        ],
    );
    s.converge();
    let c = s.config(400);
    // Running: memory waits in [PENDING] for the next cold start.
    assert_eq!(c["memory"], "2048");
    let pending = s
        .sim
        .inspect(|st| st.vms[&400].config.pending.get("memory").cloned());
    assert_eq!(pending.as_deref(), Some("4096"));
    // Plan is satisfied; drift says the change is not in effect yet.
    let (code, out, _) = s.run(&["drift", "fleet.yaml"]);
    assert_eq!(code, 0, "{out}");
    assert_contains(
        &out,
        &["vm.web-01: waits for a cold start: memory 2048 -> 4096"],
    );
    assert!(c["scsi0"].contains("size=40G"), "{}", c["scsi0"]);
    assert!(
        c["net0"].starts_with("virtio=BC:24:11:"),
        "the MAC survives: {}",
        c["net0"]
    );
}

#[test]
fn restart_on_change_applies_cold_changes_in_the_same_apply() {
    let restarting = WEB_01.replace(
        "    onboot: true\n",
        "    onboot: true\n    restart_on_change: true\n",
    );
    let s = Scenario::new(single_node(), &base_fleet(&restarting), &golden_lock());
    s.converge();
    s.set_fleet(&base_fleet(
        &restarting.replace("memory: 2048", "memory: 4096"),
    ));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "~ memory = 2048 -> 4096",
            "the VM is shut down and started to apply it",
        ],
    );
    let out = s.apply();
    assert_contains(&out, &["vm.web-01: done"]);
    let (memory, pending, running) = s.sim.inspect(|st| {
        let vm = &st.vms[&400];
        (
            vm.config.values["memory"].clone(),
            vm.config.pending.len(),
            vm.running,
        )
    });
    assert_eq!(
        (memory.as_str(), pending, running),
        ("4096", 0, true),
        "in effect, nothing pending, running again"
    );
    let (code, out, _) = s.run(&["drift", "fleet.yaml"]);
    assert_eq!(code, 0);
    assert!(!out.contains("waits for a cold start"), "{out}");
}

#[test]
fn replace_recreates_a_vm_that_matches_the_fleet() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    s.converge();
    let (mac, uuid) = (
        s.config(400)["net0"].clone(),
        s.config(400)["smbios1"].clone(),
    );
    let (code, out, _) = s.run(&["plan", "fleet.yaml", "--replace", "vm.web-01"]);
    assert_eq!(code, 0);
    assert_contains(
        &out,
        &[
            "-/+ vm.web-01",
            "replacement requested with --replace",
            "Plan: 0 to create, 0 to update, 1 to replace, 0 to destroy.",
        ],
    );
    let replace = || {
        let (code, out, err) = s.run(&[
            "apply",
            "fleet.yaml",
            "--auto-approve",
            "--replace",
            "vm.web-01",
        ]);
        assert_eq!(code, 0, "{out}{err}");
    };
    replace();
    assert_ne!(
        s.config(400)["smbios1"],
        uuid,
        "a new VM (a clone's new SMBIOS uuid)"
    );
    assert_eq!(
        s.config(400)["net0"],
        mac,
        "that keeps the old one's MAC (DHCP reservations stay valid)"
    );
    let (code, _) = s.plan();
    assert_eq!(code, 0);

    // A new storage is not acted on; the note says how.
    let moved = WEB_01.replace(
        "    onboot: true\n",
        "    onboot: true\n    storage: local-lvm\n",
    );
    s.set_fleet(&base_fleet(&moved));
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
    assert_contains(
        &text,
        &[
            "Note: vm.web-01's disk is on storage `tank`, the fleet says `local-lvm`; nixgold does not move disks: `--replace vm.web-01` re-creates the VM that way.",
        ],
    );
    let (code, out, _) = s.run(&["drift", "fleet.yaml"]);
    assert_eq!(code, 0, "a note is not drift: {out}");
    assert_contains(&out, &["Note: vm.web-01's disk is on storage `tank`"]);
    replace();
    assert!(s.config(400)["scsi0"].starts_with("local-lvm:"));
    let (code, text) = s.plan();
    assert_eq!(code, 0);
    assert!(!text.contains("Note:"), "{text}");
    // Full to linked: noted the same way, and --replace makes it so.
    let linked = WEB_01.replace(
        "    onboot: true\n",
        "    onboot: true\n    clone: linked\n",
    );
    s.set_fleet(&base_fleet(&linked));
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
    assert_contains(
        &text,
        &["Note: vm.web-01 is a full clone, the fleet says linked; nixgold does not move disks"],
    );
    replace();
    let (code, text) = s.plan();
    assert_eq!(code, 0);
    assert!(!text.contains("Note:"), "a linked clone now: {text}");

    let (code, _, err) = s.run(&["plan", "fleet.yaml", "--replace", "vm.nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--replace vm.nope: the fleet has no such VM"),
        "{err}"
    );
    // A typo in --target used to plan nothing and exit 0 ("No changes.").
    let (code, out, err) = s.run(&["plan", "fleet.yaml", "--target", "vm.web-1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("--target vm.web-1: neither the fleet nor the cluster has this resource")
            && err.contains("did you mean vm.web-01?"),
        "{err}"
    );
    let (code, out, err) = s.run(&[
        "apply",
        "fleet.yaml",
        "--auto-approve",
        "--target",
        "vm.nope",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("--target vm.nope: neither the fleet nor the cluster has this resource"),
        "{err}"
    );
    let (code, _, err) = s.run(&["plan", "fleet.yaml", "--replace", "vm.web01"]);
    assert_eq!(code, 1);
    assert!(err.contains("did you mean vm.web-01?"), "{err}");
    s.set_fleet(&base_fleet(&WEB_01.replace(
        "    onboot: true\n",
        "    onboot: true\n    prevent_destroy: true\n",
    )));
    let (code, _, err) = s.run(&["plan", "fleet.yaml", "--replace", "vm.web-01"]);
    assert_eq!(code, 1);
    assert!(err.contains("prevent_destroy"), "{err}");
}

#[test]
fn removed_vms_are_kept_unless_destroy_is_allowed() {
    let two = format!("{WEB_01}  web-02:\n    image: golden\n    network: {{ dhcp: true }}\n");
    let s = Scenario::new(single_node(), &base_fleet(&two), &golden_lock());
    s.converge();
    let web02 = s.sim.inspect(|st| {
        st.vms
            .iter()
            .find(|(_, v)| v.config.values.get("name").map(String::as_str) == Some("web-02"))
            .map(|(id, _)| *id)
    });
    assert_eq!(web02, Some(1000), "allocated from vm_vmid_range");
    s.set_fleet(&base_fleet(WEB_01));
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
    assert_contains(
        &text,
        &["Note: vm.web-02 (VMID 1000) is no longer in the fleet; it is kept."],
    );
    let (code, text, _) = s.run(&["plan", "fleet.yaml", "--allow-destroy"]);
    assert_eq!(code, 0);
    insta::assert_snapshot!("destroy_plan", text);
    assert_contains(&text, &["- vm.web-02"]);
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve", "--allow-destroy"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(s.sim.inspect(|st| !st.vms.contains_key(&1000)));
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
}

#[test]
fn a_vmid_taken_by_a_foreign_vm_is_an_error_not_an_adoption() {
    let s = Scenario::new(
        with_foreign_vm(single_node(), 400),
        &base_fleet(WEB_01),
        &golden_lock(),
    );
    let (code, _, stderr) = s.run(&["plan", "fleet.yaml"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "vm.web-01: VMID 400 is taken by a VM nixgold does not own (`someone-elses` on pve)"
        ),
        "{stderr}"
    );
    let (code, _, _) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1);
    assert_eq!(
        s.config(400).get("name").map(String::as_str),
        Some("someone-elses"),
        "untouched"
    );
}

#[test]
fn drift_made_behind_nixgolds_back_is_planned_back() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    s.converge();
    s.api(
        "PUT",
        "/nodes/pve/qemu/400/config",
        &[
            ("cores", "8"),
            ("tags", "prod;nixgold;nixgold.homelab;extra"),
        ],
    );
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    insta::assert_snapshot!("drift_plan", text);
    assert_contains(&text, &["~ cores", "8 -> 2"]);
    s.converge();
}

#[test]
fn drift_reports_what_changed_and_changes_nothing() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    s.converge();
    let prom = s.dir.path().join("drift.prom");
    let prom_arg = prom.to_str().unwrap();
    let (code, out, err) = s.run(&["drift", "fleet.yaml", "--prometheus", prom_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("No drift: the cluster matches fleet `homelab`."),
        "{out}"
    );
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert_contains(
        &metrics,
        &[
            "nixgold_drift_success{fleet=\"homelab\"} 1",
            "nixgold_drift_detected{fleet=\"homelab\"} 0",
        ],
    );

    // Behind nixgold's back: a VM's memory, and someone else's VM.
    s.api("PUT", "/nodes/pve/qemu/400/config", &[("memory", "1024")]);
    s.api(
        "POST",
        "/nodes/pve/qemu",
        &[("vmid", "777"), ("name", "someone-else")],
    );
    let lock = std::fs::read_to_string(s.dir.path().join("fleet.lock")).unwrap();
    let (code, out, err) = s.run(&["drift", "fleet.yaml", "--prometheus", prom_arg]);
    assert_eq!(code, 2, "{out}{err}");
    assert_contains(
        &out,
        &[
            "Drift in fleet `homelab`: apply would change these resources:",
            "~ vm.web-01 {",
            "~ memory",
            "VMs whose configuration waits for a shutdown and start:\n  vm.web-01: waits for a cold start: memory 2048 -> 1024",
            "VMs this fleet does not manage:\n  vmid.777: someone-else on pve",
            // The template here was never built in the simulator: its
            // clone has no guest model to look into.
            "VMs nixgold cannot look inside (not inspectable, so not known to be in sync):\n  vm.web-01: get-osinfo: ",
            "Drift: 1 changed, 0 missing, 0 destroy, 0 removed, 0 old generation, 1 pending, 1 unmanaged, 0 guest moved, 1 not inspectable.",
        ],
    );
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert_contains(
        &metrics,
        &[
            "nixgold_drift_detected{fleet=\"homelab\"} 1",
            "nixgold_drift_resources{fleet=\"homelab\",kind=\"changed\"} 1",
            "nixgold_drift_resources{fleet=\"homelab\",kind=\"unmanaged\"} 1",
            "nixgold_drift_resource{fleet=\"homelab\",kind=\"changed\",address=\"vm.web-01\"} 1",
        ],
    );
    // Nothing was changed: not the cluster, not the lockfile.
    let memory = s
        .sim
        .inspect(|st| st.vms[&400].config.effective(false)["memory"].clone());
    assert_eq!(memory, "1024", "still what was set behind nixgold's back");
    assert_eq!(
        std::fs::read_to_string(s.dir.path().join("fleet.lock")).unwrap(),
        lock
    );
    let (code, json, _) = s.run(&["drift", "fleet.yaml", "--json"]);
    assert_eq!(code, 2);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let kinds: Vec<(&str, &str)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["kind"].as_str().unwrap(), f["address"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("changed", "vm.web-01"),
            ("unmanaged", "vmid.777"),
            ("pending", "vm.web-01"),
            ("not_inspectable", "vm.web-01")
        ]
    );

    // A VM that left the fleet is drift too.
    s.set_fleet(&base_fleet("  {}\n"));
    let (code, out, _) = s.run(&["drift", "fleet.yaml"]);
    assert_eq!(code, 2);
    assert_contains(
        &out,
        &[
            "vm.web-01 is no longer in the fleet (VMID 400 is stamped by this fleet but no longer in it)",
        ],
    );
}

#[test]
fn a_drift_check_that_cannot_reach_the_cluster_says_so_in_its_textfile() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let prom = s.dir.path().join("drift.prom");
    let closed = free_port("127.0.0.1");
    let out = s
        .command(&[
            "drift",
            "fleet.yaml",
            "--prometheus",
            prom.to_str().unwrap(),
        ])
        .env("PROXMOX_VE_ENDPOINT", format!("http://127.0.0.1:{closed}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert_contains(&metrics, &["nixgold_drift_success{fleet=\"homelab\"} 0"]);
    assert!(!metrics.contains("nixgold_drift_detected"), "{metrics}");
}

#[test]
fn multi_node_placement_clones_locally_or_from_shared_storage() {
    let mut cluster = ClusterSpec::with_nodes(2);
    cluster.vms.push(template(9000, "pve1", "base", 1, "ceph"));
    cluster
        .vms
        .push(template(9100, "pve1", "local", 1, "local-lvm"));
    cluster
        .vms
        .push(template(9101, "pve2", "local", 1, "local-lvm"));
    let fleet = format!(
        r#"fleet: homelab
proxmox:
  endpoint: https://pve1.example.invalid:8006
  nodes: [pve1, pve2]
  shared_storages: [ceph]
  token: {{ env: PROXMOX_VE_API_TOKEN }}
vm_vmid_range: {{ first: 1000, last: 1099 }}
isos:
  nixos: {{ url: "{ISO_URL}", checksum: "sha256:{ISO_SHA}" }}
images:
  base:
    iso: nixos
    build_node: pve1
    vmid_range: {{ first: 9000, last: 9009 }}
    hardware: {{ disk: 30G, storage: ceph }}
    nixos: {{ state_version: "24.05" }}
  local:
    iso: nixos
    build_node: pve1
    vmid_range: {{ first: 9100, last: 9109 }}
    hardware: {{ disk: 30G, storage: local-lvm }}
    nixos: {{ state_version: "24.05" }}
vms:
  a: {{ image: base, node: pve1, clone: linked }}
  b: {{ image: base, node: pve2 }}
  c: {{ image: local, node: pve1, clone: linked }}
  d: {{ image: local, node: pve2, clone: linked }}
"#
    );
    let lock = lock_with(
        &fleet,
        &[
            ("base", 1, &[("pve1", 9000)]),
            ("local", 1, &[("pve1", 9100), ("pve2", 9101)]),
        ],
    );
    let s = Scenario::new(cluster, &fleet, &lock);
    let (code, text) = s.plan();
    assert_eq!(code, 2, "{text}");
    insta::assert_snapshot!("multi_node_plan", text);
    s.converge();
    let placed: Vec<(String, String)> = s.sim.inspect(|st| {
        st.vms
            .values()
            .filter(|v| !v.config.is_template())
            .map(|v| (v.config.values["name"].clone(), v.node.clone()))
            .collect()
    });
    for (name, node) in [("a", "pve1"), ("b", "pve2"), ("c", "pve1"), ("d", "pve2")] {
        assert!(
            placed.contains(&(name.to_owned(), node.to_owned())),
            "{name} on {node}: {placed:?}"
        );
    }
}

/// `tank` shrunk to `gib`, on another plugin.
fn small_tank(plugin: &str, gib: u64) -> ClusterSpec {
    let mut cluster = single_node();
    let tank = cluster
        .storages
        .iter_mut()
        .find(|s| s.id == "tank")
        .unwrap();
    tank.capacity = gib << 30;
    tank.plugin = plugin.into();
    cluster
}

/// Thick storage reserves every volume's size, so a plan that does not fit
/// fails on the real cluster too (pve-storage `zfs create -V` without
/// `-s`): plan warns before apply. A thin pool over-commits and applies;
/// plan says so.
#[test]
fn plan_warns_when_thick_storage_cannot_hold_it_and_notes_thin_over_commit() {
    // The thick template's 30G leave 10G free.
    let s = Scenario::new(
        small_tank("zfspool", 40),
        &base_fleet(WEB_01),
        &golden_lock(),
    );
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "Note: warning: storage `tank` on pve (zfspool) cannot hold what the plan allocates: 30G needed, 10G free",
        ],
    );
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_ne!(code, 0, "{out}");
    assert_contains(
        &err,
        &["zfs error: cannot create 'tank/vm-400-disk-0': out of space"],
    );

    // A thin template holds only what was written: 20G stay free.
    let s = Scenario::new(
        small_tank("lvmthin", 20),
        &base_fleet(WEB_01),
        &golden_lock(),
    );
    let (_, text) = s.plan();
    assert_contains(
        &text,
        &[
            "Note: storage `tank` on pve is thin (lvmthin): the plan's new volumes (30G) over-commit its 20G free",
        ],
    );
    s.converge();
}

#[test]
fn locked_refuses_to_plan_with_a_lockfile_that_must_change() {
    let two = format!("{WEB_01}  web-02:\n    image: golden\n");
    let s = Scenario::new(single_node(), &base_fleet(&two), &golden_lock());
    let (code, _, stderr) = s.run(&["--locked", "plan", "fleet.yaml"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--locked"), "{stderr}");
}

#[test]
fn saved_plans_apply_only_while_nothing_moved() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let (code, _, err) = s.run(&["plan", "fleet.yaml", "--out", "web.plan"]);
    assert_eq!(code, 0, "{err}");
    // Someone changes the cluster in between: refused.
    s.api(
        "PUT",
        "/nodes/pve/qemu/9400/config",
        &[(
            "description",
            "nixgold: fleet=homelab resource=image.golden generation=1\nnote",
        )],
    );
    let (code, _, err) = s.run(&["apply", "web.plan"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("the cluster changed since the plan was saved"),
        "{err}"
    );
    let (code, _, err) = s.run(&["plan", "fleet.yaml", "--out", "web.plan"]);
    assert_eq!(code, 0, "{err}");
    // Another endpoint (PROXMOX_VE_ENDPOINT overrides the fleet's) is
    // another cluster: refused before anything is read or written there.
    let out = s
        .command(&["apply", "web.plan"])
        .env("PROXMOX_VE_ENDPOINT", "https://pve2.example.invalid:8006")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("this run targets the Proxmox endpoint https://pve2.example.invalid:8006"),
        "{err}"
    );
    let (code, out, err) = s.run(&["apply", "web.plan"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
}

#[test]
fn apply_without_a_terminal_needs_auto_approve() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let (code, _, err) = s.run(&["apply", "fleet.yaml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("refusing to apply without confirmation"),
        "{err}"
    );
    assert!(s.sim.inspect(|st| !st.vms.contains_key(&400)));
}

#[test]
fn targets_limit_a_run() {
    let two = format!("{WEB_01}  web-02:\n    image: golden\n");
    let s = Scenario::new(single_node(), &base_fleet(&two), &golden_lock());
    let (code, text, _) = s.run(&["plan", "fleet.yaml", "--target", "vm.web-02"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("+ vm.web-02") && !text.contains("vm.web-01"),
        "{text}"
    );
}

#[test]
fn the_api_call_count_does_not_grow_with_unmanaged_vms() {
    let count = |extra: u32| {
        let mut cluster = single_node();
        cluster.vms.extend((0..extra).map(|i| VmSpec {
            vmid: 5000 + i,
            node: "pve".into(),
            config: Default::default(),
            template: false,
            running: i % 2 == 0,
        }));
        let s = Scenario::new(cluster, &base_fleet(WEB_01), &golden_lock());
        s.converge();
        let (_, out, _) = s.run(&["--json", "plan", "fleet.yaml"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["nixgold"]["api_calls"].as_u64().unwrap()
    };
    let small = count(0);
    assert_eq!(small, count(1000), "unmanaged VMs cost no API calls");
    // resources(vm) + resources(storage) + ISO listing + the config of the
    // template and of the VM + the disk listing of the VM's storage: one
    // call per managed VM, since its running state comes from the listing.
    assert_eq!(small, 6);
}

/// A VM this apply clones is ours and stopped: its VMID taken by anyone
/// else fails the clone task (qemu-server `PVE/API2/Qemu.pm`, `clone_vm`:
/// "unable to create VM N: config file already exists", checked under the
/// target's lock), and the `PUT …/config` that `apidoc.json` calls the
/// synchronous API needs no task for a stopped VM. So it is configured
/// with one synchronous write and started without reading its config or
/// status first. The requests per VM are the budget that keeps a hundred
/// clones at the cluster's pace.
#[test]
fn a_new_clone_costs_a_clone_a_config_write_and_a_start() {
    let vms: String = (1..=3)
        .map(|i| format!("  web-0{i}:\n    image: golden\n"))
        .collect();
    let s = Scenario::new(single_node(), &base_fleet(&vms), &golden_lock());
    let mark = s.sim.journal().len();
    s.apply();
    let journal = s.sim.journal();
    let new: Vec<String> = s.sim.inspect(|st| {
        st.vms
            .iter()
            .filter(|(_, vm)| !vm.config.values.contains_key("template"))
            .map(|(id, _)| id.to_string())
            .collect()
    });
    assert_eq!(new.len(), 3);
    for vmid in &new {
        let vmid = vmid.as_str();
        let calls: Vec<String> = journal[mark..]
            .iter()
            .filter(|e| {
                e.params
                    .get("newid")
                    .or(e.params.get("vmid"))
                    .map(String::as_str)
                    == Some(vmid)
                    && !e.route.contains("/tasks/")
            })
            .map(|e| format!("{} {}", e.method, e.route))
            .collect();
        assert_eq!(
            calls,
            [
                "POST /nodes/{node}/qemu/{vmid}/clone",
                "PUT /nodes/{node}/qemu/{vmid}/config",
                "POST /nodes/{node}/qemu/{vmid}/status/start",
            ],
            "VM {vmid}"
        );
    }
    let (code, text) = s.plan();
    assert_eq!(code, 0, "converged: {text}");
}

#[test]
fn a_lagging_cluster_status_does_not_start_a_running_vm_again() {
    // `/cluster/resources` reports what pvestatd last broadcast
    // (`extract_vm_stats` in pve-manager's PVE/API2Tools.pm reads the status
    // from the RRD, 'unknown' before the first entry), so right after apply
    // it does not say the new VM runs. The plan confirms with the node-local
    // `status/current` before proposing a start, and stays empty.
    let mut opts = options();
    opts.resources_lag = Duration::from_secs(60);
    let s = Scenario::with_options(single_node(), &base_fleet(WEB_01), &golden_lock(), opts);
    s.converge();
    let (_, out, _) = s.run(&["--json", "plan", "fleet.yaml"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["nixgold"]["api_calls"].as_u64().unwrap(),
        7,
        "the budget of 6 plus one status read: the new VM is 'unknown' in the listing"
    );
}

#[test]
fn apply_survives_faults_and_finishes_on_rerun_without_duplicates() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let faults = &s.sim.options().faults;
    // Lock contention on the first config write (a synchronous PUT right
    // after the clone) is retried the careful way — read, check the
    // owner, write with the digest — and a 595 on that write is retried.
    faults.add(
        "PUT /nodes/*/qemu/*/config => lock-timeout*1"
            .parse()
            .unwrap(),
    );
    faults.add("POST /nodes/*/qemu/*/config => 595*1".parse().unwrap());
    s.converge();
    assert!(
        faults.list().iter().all(|r| r.remaining == Some(0)),
        "every fault fired: {:?}",
        faults.list()
    );
    // A failed clone task: apply fails, the re-run finishes.
    let two = format!("{WEB_01}  web-02:\n    image: golden\n");
    s.set_fleet(&base_fleet(&two));
    faults.add(
        "POST /nodes/*/qemu/*/clone => task-fail:storage went away*1"
            .parse()
            .unwrap(),
    );
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("vm.web-02: FAILED at linked clone") || out.contains("FAILED"),
        "{out}"
    );
    // A dropped connection mid-apply (the start call).
    faults.add(
        "POST /nodes/*/qemu/*/status/start => drop*1"
            .parse()
            .unwrap(),
    );
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert!(code == 0 || code == 1, "{out}{err}");
    s.converge();
    let names: Vec<String> = s.sim.inspect(|st| {
        st.vms
            .values()
            .filter_map(|v| v.config.values.get("name").cloned())
            .collect()
    });
    assert_eq!(
        names.iter().filter(|n| *n == "web-02").count(),
        1,
        "no duplicate: {names:?}"
    );
}

#[test]
fn lock_timeouts_on_clones_lower_the_concurrency_and_every_clone_goes_through() {
    let vms: String = (1..=6)
        .map(|i| format!("  web-0{i}:\n    image: golden\n"))
        .collect();
    let s = Scenario::new(single_node(), &base_fleet(&vms), &golden_lock());
    s.sim.options().faults.add(
        // The limit starts at its ceiling (128): seven halvings to one.
        "POST /nodes/*/qemu/*/clone => lock-timeout*7"
            .parse()
            .unwrap(),
    );
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("lock contention: at most 1 such clones at once now"),
        "the limit of the template's clones was halved down to one:\n{err}"
    );
    assert!(!err.contains("FAILED"), "{err}");
    assert!(out.contains("7 created"), "the ISO and six VMs: {out}");
    let (code, text) = s.plan();
    assert_eq!(code, 0, "converged:\n{text}");
}

#[test]
fn a_kill_between_clone_and_start_is_finished_by_the_next_apply() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    s.apply_killed_while_starting();
    // The killed run's apply lock stays behind; break it, then re-plan.
    s.run(&["force-unlock", &s.lock_id(), "fleet.yaml"]);
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(&text, &["~ vm.web-01", "\"stopped\" -> \"running\""]);
    s.converge();
    assert_eq!(
        s.sim.inspect(|st| st.vms.len()),
        2,
        "the template and one VM"
    );
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ----- template builds ---------------------------------------------------

const BUILD: &str = "    build: { boot_wait: 1s, timeout: 2m, timeouts: { access: 20s }, key_interval_ms: 0, address: { call_home: { listen: \"127.0.0.1:0\" } } }\n";

/// The base fleet with fast build settings and `packages` in the image.
fn build_fleet(packages: &str) -> String {
    base_fleet(WEB_01).replace(
        "    nixos: { state_version: \"24.05\" }\n",
        &format!("    nixos: {{ state_version: \"24.05\", packages: [{packages}] }}\n{BUILD}"),
    )
}

const EMPTY_LOCK: &str = "version = 1\nfleet = \"homelab\"\n";

fn read_lock(s: &Scenario) -> nixgold::lock::Lockfile {
    nixgold::lock::Lockfile::read(&s.dir.path().join("fleet.lock")).unwrap()
}

/// The guest's command history with the per-build secrets (token, port,
/// key) replaced, for a stable snapshot.
fn redacted_history(s: &Scenario, vmid: u32) -> String {
    s.sim
        .guests()
        .history(vmid)
        .iter()
        .map(|line| {
            let mut l = line.clone();
            if let Some(at) = l.find("http://127.0.0.1:") {
                let end = l[at..].find(' ').map_or(l.len(), |e| at + e);
                l.replace_range(at..end, "http://127.0.0.1:PORT/TOKEN");
            }
            if let Some(at) = l.find("ssh-ed25519 ") {
                let end = l[at + 12..].find(' ').map_or(l.len(), |e| at + 12 + e);
                l.replace_range(at..end, "ssh-ed25519 BUILD-KEY");
            }
            l
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn builds_generation_1_from_an_empty_cluster_and_clones_from_it() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "+ image.golden[pve]",
            "the image has no generation yet",
            "clone       = \"full of image.golden generation 1 (to build) (VMID 9400)\"",
        ],
    );
    s.converge();
    let lock = read_lock(&s);
    let generation = lock.images["golden"].current_generation().unwrap();
    assert_eq!(
        (generation.number, generation.templates[0].vmid.get()),
        (1, 9400)
    );
    assert!(
        generation
            .system_path
            .contains("-nixos-system-nixos-24.05-x86_64-linux")
            || generation.system_path.starts_with("/nix/store/")
    );
    let template = s.config(9400);
    assert_eq!(template["template"], "1");
    assert!(
        template["ide2"].contains("cloudinit"),
        "the ISO was replaced by a cloud-init drive: {template:?}"
    );
    assert!(s.sim.inspect(|st| st.vms[&400].running));
    // The exact sequence the guest received, secrets redacted.
    let history = redacted_history(&s, 9400);
    insta::assert_snapshot!("build_guest_history", history);
    assert!(
        history.starts_with("console$ sudo -i\nconsole$ curl -fsS"),
        "{history}"
    );
    assert!(history.contains("ssh$ bash /tmp/nixgold/install.sh /tmp/nixgold/configuration.nix"));
    assert!(history.ends_with("ssh$ poweroff"), "{history}");
    // The whole build, install output included, is in its log.
    let log =
        std::fs::read_to_string(s.dir.path().join(".nixgold/logs/golden-g1-pve.log")).unwrap();
    assert_contains(
        &log,
        &[
            "generation 1 (VMID 9400): 1/9 create the build VM…",
            "  | [nixgold] partition",
            "  | installation finished!",
            "generation 1 (VMID 9400): 4/9 install NixOS done (",
        ],
    );
}

#[test]
fn a_changed_package_builds_generation_2_while_the_vm_keeps_running_and_rollback_returns() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    s.converge();
    s.set_fleet(&build_fleet("\"vim\", \"htop\""));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(&text, &["+ image.golden[pve]", "build generation 2"]);
    assert!(
        text.contains("vmid       = 9401"),
        "a new generation gets a new VMID: {text}"
    );
    assert!(
        !text.contains("vm.web-01"),
        "the VM keeps its generation (on_new_generation = keep): {text}"
    );
    s.converge();
    let lock = read_lock(&s);
    assert_eq!(lock.images["golden"].current, 2);
    assert_eq!(
        lock.images["golden"].generations.len(),
        2,
        "generation 1 is kept"
    );
    assert!(s.sim.inspect(|st| st.vms[&400].running
        && st.vms.contains_key(&9400)
        && st.vms.contains_key(&9401)));
    // Staying on generation 1 is the fleet's choice: reported, not drift.
    let (code, out, _) = s.run(&["drift", "fleet.yaml"]);
    assert_eq!(code, 0, "{out}");
    assert_contains(
        &out,
        &[
            "VMs on an older generation:\n  vm.web-01: runs image.golden generation 1; the current generation is 2",
        ],
    );
    // Back to the old package list and generation 1.
    s.set_fleet(&build_fleet("\"vim\""));
    let (code, out, err) = s.run(&["rollback", "fleet.yaml", "--image", "golden"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(read_lock(&s).images["golden"].current, 1);
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
}

#[test]
fn a_failed_template_conversion_leaves_no_half_generation() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    s.fault("POST /nodes/*/qemu/*/template => task-fail:storage error*1");
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("image.golden[pve]: FAILED") && out.contains("storage error"),
        "{out}"
    );
    assert!(
        out.contains("vm.web-01: skipped (image.golden[pve] failed)"),
        "{out}"
    );
    assert!(
        read_lock(&s).images.is_empty(),
        "no half-registered generation"
    );
    assert!(
        s.sim.inspect(|st| !st.vms.contains_key(&9400)),
        "the build VM was destroyed"
    );
    s.converge();
}

#[test]
fn keep_failed_build_keeps_the_vm_and_the_next_apply_cleans_it_up() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    s.fault("POST /nodes/*/qemu/*/template => task-fail:storage error*1");
    let (code, _, err) = s.run(&[
        "apply",
        "fleet.yaml",
        "--auto-approve",
        "--keep-failed-build",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("kept the failed build VM 9400"), "{err}");
    assert!(s.sim.inspect(|st| st.vms.contains_key(&9400)));
    let (_, text) = s.plan();
    assert_contains(&text, &["destroy the leftover build VM 9400"]);
    s.converge();
}

/// A build scenario whose installer console comes up after `boot`, with
/// `build.timeouts.access` = `access`.
fn slow_console(boot: Duration, access: &str) -> Scenario {
    let mut opts = options();
    opts.guest_boot = boot;
    let fleet = build_fleet("\"vim\"").replace("access: 20s", &format!("access: {access}"));
    Scenario::with_options(ClusterSpec::default(), &fleet, EMPTY_LOCK, opts)
}

#[test]
fn keys_typed_before_the_installer_is_up_end_in_a_clear_error() {
    let s = slow_console(Duration::from_secs(60), "2s");
    apply_fails_cleanly(
        &s,
        &[
            "get SSH access to the installer: access: the build VM did not call home",
            "raise build.boot_wait",
            "(the deadline is build.timeouts.access = 2s)",
        ],
    );
}

/// The build fleet keeping one generation.
fn keep_one(packages: &str) -> String {
    build_fleet(packages).replace(BUILD, &format!("{BUILD}    rebuild: {{ keep: 1 }}\n"))
}

#[test]
fn generations_beyond_keep_go_once_no_linked_clone_uses_them() {
    let linked = |packages: &str| {
        keep_one(packages).replace(
            "    onboot: true\n",
            "    onboot: true\n    clone: linked\n",
        )
    };
    let s = Scenario::new(ClusterSpec::default(), &linked("\"vim\""), EMPTY_LOCK);
    s.converge();
    s.set_fleet(&linked("\"vim\", \"htop\""));
    s.converge();
    // Generation 1 is beyond keep = 1, but web-01 is a linked clone of it.
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(
            "Note: image.golden generation 1 is beyond rebuild.keep but stays: vm.web-01 use it."
        ),
        "{text}"
    );
    // Move the VM to the new generation: the same apply replaces it and
    // then retires generation 1, which nothing uses any more.
    s.set_fleet(&linked("\"vim\", \"htop\"").replace(
        "    onboot: true\n",
        "    onboot: true\n    on_new_generation: replace\n",
    ));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &["-/+ vm.web-01", "- image.golden[pve] generation 1"],
    );
    retires_generation_1(&s);
    assert!(s.sim.inspect(|st| st.vms.contains_key(&9401)));
}

/// Applies a plan that retires generation 1 (beyond `keep`, no linked
/// clone left on it) and checks that it converged in that one apply, with
/// only generation 2 left; returns apply's output.
fn retires_generation_1(s: &Scenario) -> String {
    let out = s.apply();
    assert_contains(
        &out,
        &[
            "- image.golden[pve] generation 1",
            "beyond rebuild.keep = 1 and no linked clone uses it",
            "image.golden[pve] generation 1: done",
        ],
    );
    let (code, text) = s.plan();
    assert_eq!(code, 0, "not converged in one apply:\n{text}");
    let numbers: Vec<u32> = read_lock(s).images["golden"]
        .generations
        .iter()
        .map(|g| g.number)
        .collect();
    assert_eq!(numbers, [2]);
    assert!(s.sim.inspect(|st| !st.vms.contains_key(&9400)));
    out
}

/// `keep = 1`: the apply that builds generation 2 also retires generation
/// 1 — after the build is recorded — so the plan after it is empty. (Before
/// the plan was a DAG, generation 1 stayed until the next apply, and the
/// plan after the build still said "generation 1 will be destroyed".)
#[test]
fn keep_one_converges_in_the_apply_that_builds_generation_2() {
    let s = Scenario::new(ClusterSpec::default(), &keep_one("\"vim\""), EMPTY_LOCK);
    s.converge();
    s.set_fleet(&keep_one("\"vim\", \"htop\""));
    // web-01, a full clone, still runs what it was cloned from but does not
    // need the template: generation 1 goes.
    let out = retires_generation_1(&s);
    assert!(
        out.find("image.golden[pve]: done") < out.find("image.golden[pve] generation 1: done"),
        "{out}"
    );
    assert!(!out.contains("vm.web-01"), "the VM stays as it is: {out}");
    assert!(s.sim.inspect(|st| st.vms[&400].running));
}

/// The build fleet keeping two generations.
fn keep_two(packages: &str) -> String {
    build_fleet(packages).replace(BUILD, &format!("{BUILD}    rebuild: {{ keep: 2 }}\n"))
}

/// A scenario with generations 1 and 2 of `golden` built with `keep = 2`
/// (templates 9400 and 9401) and web-01 cloned from generation 1.
fn two_generations() -> Scenario {
    let s = Scenario::new(ClusterSpec::default(), &keep_two("\"vim\""), EMPTY_LOCK);
    s.converge();
    s.set_fleet(&keep_two("\"vim\", \"htop\""));
    s.converge();
    s
}

/// `keep = 2`, generations 1 and 2 built, the generation-3 build fails:
/// both templates and the VM are untouched and the lockfile still has both.
/// (Apply used to destroy generation 1 first, in its destroy phase, and
/// then fail the build.) Once the fault clears, one apply builds
/// generation 3 and retires generation 1, and the next plan is empty.
#[test]
fn a_failed_build_costs_no_template_and_the_retry_converges() {
    let s = two_generations();
    let vm_before = s.config(400);
    s.set_fleet(&keep_two("\"vim\", \"htop\", \"git\""));
    s.fault("POST /nodes/*/qemu/*/template => task-fail:storage error*1");
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &out,
        &[
            "- image.golden[pve] generation 1",
            "image.golden[pve]: FAILED",
            "image.golden[pve] generation 1: skipped (image.golden[pve] failed)",
        ],
    );
    assert!(s.sim.inspect(|st| {
        [9400, 9401]
            .iter()
            .all(|id| st.vms[id].config.values.get("template").map(String::as_str) == Some("1"))
    }));
    assert!(
        s.sim.inspect(|st| !st.vms.contains_key(&9402)),
        "the build VM went"
    );
    assert_eq!(s.config(400), vm_before, "the VM is untouched");
    let lock = read_lock(&s);
    let numbers: Vec<u32> = lock.images["golden"]
        .generations
        .iter()
        .map(|g| g.number)
        .collect();
    assert_eq!((numbers, lock.images["golden"].current), (vec![1, 2], 2));

    let out = s.apply();
    assert_contains(&out, &["image.golden[pve] generation 1: done"]);
    let (code, text) = s.plan();
    assert_eq!(code, 0, "not converged in one apply:\n{text}");
    let lock = read_lock(&s);
    let numbers: Vec<u32> = lock.images["golden"]
        .generations
        .iter()
        .map(|g| g.number)
        .collect();
    assert_eq!((numbers, lock.images["golden"].current), (vec![2, 3], 3));
    assert!(s.sim.inspect(|st| {
        !st.vms.contains_key(&9400)
            && st.vms[&9402]
                .config
                .values
                .get("template")
                .map(String::as_str)
                == Some("1")
    }));
}

/// Three generations with `keep = 2`, then `rollback` (to 2): the plan
/// after it builds nothing and destroys nothing — it says the image is
/// held. (It used to build a "generation 4" with generation 3's inputs and
/// destroy generation 3, the one just rolled back from.) A change of the
/// image in the fleet afterwards ends the hold and builds generation 4.
#[test]
fn a_rollback_holds_until_the_fleet_changes() {
    let s = two_generations();
    s.set_fleet(&keep_two("\"vim\", \"htop\", \"git\""));
    s.converge();
    let (code, out, err) = s.run(&["rollback", "fleet.yaml", "--image", "golden"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(
        &err,
        &["generation 3 -> 2", "nixgold release --image golden"],
    );
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
    assert_contains(
        &text,
        &["image.golden is held at generation 2 by `nixgold rollback`"],
    );
    assert_eq!(read_lock(&s).images["golden"].current, 2);
    assert!(
        s.sim
            .inspect(|st| st.vms.contains_key(&9401) && st.vms.contains_key(&9402))
    );
    let (_, state, _) = s.run(&["show", "fleet.yaml"]);
    assert_contains(
        &state,
        &["image.golden: current generation 2 (held by `nixgold rollback`"],
    );

    s.set_fleet(&keep_two("\"vim\", \"htop\", \"git\", \"curl\""));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "+ image.golden[pve]",
            "build generation 4",
            "the hold on generation 2 (`nixgold rollback`) ends",
        ],
    );
    s.converge();
    let lock = read_lock(&s);
    assert_eq!(
        (lock.images["golden"].current, lock.images["golden"].hold),
        (4, None)
    );
}

/// `release` ends a hold; the kept generation whose inputs the fleet asks
/// for is reused (made current again), not rebuilt.
#[test]
fn release_reuses_the_kept_generation_the_fleet_asks_for() {
    let s = two_generations();
    let (code, out, err) = s.run(&["rollback", "fleet.yaml", "--image", "golden"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = s.run(&["release", "fleet.yaml", "--image", "golden"]);
    assert_eq!(code, 0, "{err}");
    assert_contains(&err, &["released the hold on generation 1"]);
    let (code, text) = s.plan();
    assert_eq!(code, 0, "no build: {text}");
    assert_contains(
        &text,
        &["image.golden: generation 2 is reused, not rebuilt"],
    );
    assert_eq!(read_lock(&s).images["golden"].current, 2);
}

/// Two images, one built (golden) and one to build (silver), a VM on each:
/// web-01's clone of golden does not wait for silver's build — apply has
/// no phase barriers. (It used to: every build ran before any clone.)
#[test]
fn a_clone_of_one_image_overlaps_the_build_of_another() {
    let silver = format!(
        "  silver:\n    iso: nixos\n    vmid_range: {{ first: 9410, last: 9419 }}\n    hardware: {{ disk: 30G, storage: tank }}\n    nixos: {{ state_version: \"24.05\" }}\n{BUILD}"
    );
    let web_02 = WEB_01
        .replace("web-01", "web-02")
        .replace("vmid: 400", "vmid: 401")
        .replace("image: golden", "image: silver")
        .replace("192.168.1.130", "192.168.1.131");
    let fleet =
        base_fleet(&format!("{WEB_01}{web_02}")).replace("vms:\n", &format!("{silver}vms:\n"));
    let lock = lock_with(&fleet, &[("golden", 1, &[("pve", 9400)])]);
    let s = Scenario::new(single_node(), &fleet, &lock);
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    let first = |needle: &str| {
        err.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{err}"))
    };
    let clone_done = first("vm.web-01: full clone of template 9400 done");
    let build_done = first("image.silver[pve]: generation 1 (VMID 9410): 9/9");
    assert!(
        clone_done < build_done,
        "web-01's clone waited for silver's build:\n{err}"
    );
    assert!(
        first("vm.web-02: full clone of template 9410") > build_done,
        "web-02 waits for its template:\n{err}"
    );
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
}

#[test]
fn graph_shows_the_plans_order() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    let (code, text, err) = s.run(&["graph", "--plan", "--format", "text", "fleet.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        text,
        "2. download ISOs\n   + iso.nixos[pve]\n3. build generations\n   + image.golden[pve] (after iso.nixos[pve])\n\
         4. clone and configure VMs\n   + vm.web-01 (after image.golden[pve])\n"
    );
    let (_, dot, _) = s.run(&["graph", "--plan", "fleet.yaml"]);
    assert!(
        dot.contains("\"image.golden[pve]\" -> \"vm.web-01\";"),
        "{dot}"
    );
}

/// Applies with one fault in place; the build must fail with `expected` in
/// the report and leave no build VM and no generation; the next apply
/// (without the fault) converges.
fn build_fails_cleanly(fault: &str, fleet: &str, expected: &str) {
    let s = Scenario::new(ClusterSpec::default(), fleet, EMPTY_LOCK);
    s.fault(fault);
    apply_fails_cleanly(
        &s,
        &[
            "image.golden[pve]: FAILED",
            expected,
            "build log: .nixgold/logs/golden-g1-pve.log",
        ],
    );
    let log =
        std::fs::read_to_string(s.dir.path().join(".nixgold/logs/golden-g1-pve.log")).unwrap();
    assert!(
        log.contains("FAILED at ") && log.contains(expected),
        "{log}"
    );
    s.set_fleet(&build_fleet("\"vim\""));
    s.converge();
}

#[test]
fn ssh_dropping_mid_install_fails_the_build_cleanly() {
    build_fails_cleanly(
        "SSH bash => drop*1",
        &build_fleet("\"vim\""),
        "FAILED at generation 1 (VMID 9400): 4/9 install NixOS: ssh: the connection closed before `bash` finished",
    );
}

#[test]
fn a_failing_install_command_fails_the_build_cleanly() {
    build_fails_cleanly(
        "SSH bash => task-fail:error: no space left on device*1",
        &build_fleet("\"vim\""),
        "install: exit 1: error: no space left on device",
    );
}

#[test]
fn a_hanging_task_ends_at_its_steps_deadline_and_is_stopped() {
    build_fails_cleanly(
        "POST /nodes/*/qemu/*/status/start => task-hang*1",
        &build_fleet("\"vim\"").replace(
            "timeouts: { access: 20s }",
            "timeouts: { access: 20s, start: 2s }",
        ),
        "start it from the installer ISO: task UPID:pve:",
    );
}

#[test]
fn the_whole_build_deadline_caps_every_step() {
    build_fails_cleanly(
        "POST /nodes/*/qemu/*/status/start => task-hang*1",
        &build_fleet("\"vim\"").replace("timeout: 2m", "timeout: 3s"),
        "(the deadline is build.timeout = 3s for the whole build)",
    );
}

#[test]
fn keys_lost_before_the_console_is_up_are_typed_again() {
    // boot_wait 1s: the first sequence is lost; the access window of 8s
    // retypes every 2s.
    let s = slow_console(Duration::from_secs(3), "8s");
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(read_lock(&s).images["golden"].current, 1, "built");
    let (code, text) = s.plan();
    assert_eq!(code, 0, "converged: {text}");
    let history = s.sim.guests().history(9400);
    let typed = history
        .iter()
        .filter(|l| l.starts_with("console$ curl"))
        .count();
    assert_eq!(typed, 1, "only the retyped call-home arrived: {history:?}");
    assert!(
        format!("{out}{err}").contains("no answer yet: type the access sequence again"),
        "{out}{err}"
    );
}

#[test]
fn a_mistyped_access_sequence_is_typed_again() {
    // The first key arrives wrong: `xudo -i` leaves the shell unprivileged,
    // so the call-home's key never reaches root and SSH refuses the key.
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    s.fault("PUT /nodes/*/qemu/*/sendkey => wrong-key*1");
    s.converge();
    let history = s.sim.guests().history(9400);
    assert_eq!(history[0], "console$ xudo -i", "{history:?}");
    assert!(
        history
            .iter()
            .any(|l| l.contains("mkdir: cannot create directory '/root/.ssh': Permission denied")),
        "{history:?}"
    );
    assert_eq!(
        history.iter().filter(|l| *l == "console$ sudo -i").count(),
        1,
        "typed again: {history:?}"
    );
}

#[test]
fn a_new_dhcp_lease_after_the_reboot_is_found_through_the_guest_agent() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    s.fault("SSH reboot => new-lease*1");
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("the installed system is at 127.0.0.2 (the installer was at 127.0.0.1)"),
        "{err}"
    );
    assert_eq!(read_lock(&s).images["golden"].current, 1);
    let (code, text) = s.plan();
    assert_eq!(code, 0, "converged: {text}");
}

#[test]
fn without_a_guest_agent_a_new_lease_is_a_clear_error() {
    let fleet = build_fleet("\"vim\"")
        .replace(
            "nixos: { state_version: \"24.05\",",
            "nixos: { state_version: \"24.05\", guest_agent: false,",
        )
        .replace(
            "timeouts: { access: 20s }",
            "timeouts: { access: 20s, reboot: 3s }",
        );
    let s = Scenario::new(ClusterSpec::default(), &fleet, EMPTY_LOCK);
    s.fault("SSH reboot => new-lease*1");
    apply_fails_cleanly(
        &s,
        &[
            "FAILED at generation 1 (VMID 9400): 5/9 reboot into the installed system",
            "if DHCP gave the installed system another address, enable nixos.guest_agent",
        ],
    );
}

// ----- static build addresses ---------------------------------------------

/// A port nothing listens on at `ip` (a loopback address) right now.
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scenario whose image is built on a static loopback address: the
/// simulated guests listen there on a free port, which the fleet names.
fn static_scenario(address: &str, extra: &str) -> Scenario {
    let ip = address.split('/').next().unwrap();
    let port = free_port(ip);
    let mut opts = options();
    opts.guest_ssh_port = port;
    let fleet = build_fleet("\"vim\"").replace(
        "address: { call_home: { listen: \"127.0.0.1:0\" } }",
        &format!("address: {{ static: {{ address: \"{address}\", gateway: 127.0.0.1, ssh_port: {port} }} }}"),
    ).replace("timeouts: { access: 20s }", &format!("timeouts: {{ access: 20s{extra} }}"));
    Scenario::with_options(ClusterSpec::default(), &fleet, EMPTY_LOCK, opts)
}

#[test]
fn a_static_build_address_is_typed_and_set_again_through_the_agent_after_reboot() {
    let s = static_scenario("127.77.0.10/8", "");
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(&text, &["access     = \"static 127.77.0.10/8\""]);
    s.converge();
    assert_eq!(read_lock(&s).images["golden"].current, 1);
    let history = redacted_history(&s, 9400);
    insta::assert_snapshot!("static_build_guest_history", history);
    // Typed into the installer, then through the agent after the reboot.
    let reboot = history.find("ssh$ reboot").unwrap();
    let agent = history.find("agent$ ").unwrap();
    assert!(
        history.starts_with("console$ sudo -i\nconsole$ d=$(ls /sys/class/net|grep -m1 ^en);ip l set $d up;ip a replace 127.77.0.10/8 dev $d;ip r replace default via 127.0.0.1")
            && agent > reboot,
        "{history}"
    );
    // The build address is not part of the template.
    let template = s.config(9400);
    assert!(
        template.values().all(|v| !v.contains("127.77.0.10")),
        "{template:?}"
    );
}

#[test]
fn builds_sharing_a_static_address_take_turns() {
    let port = free_port("127.77.0.13");
    let mut opts = options();
    opts.guest_ssh_port = port;
    // Node-local storage: each node gets its own build of generation 1.
    let fleet = format!(
        r#"fleet: homelab
proxmox:
  endpoint: https://pve1.example.invalid:8006
  nodes: [pve1, pve2]
  token: {{ env: PROXMOX_VE_API_TOKEN }}
vm_vmid_range: {{ first: 1000, last: 1099 }}
isos:
  nixos: {{ url: "{ISO_URL}", checksum: "sha256:{ISO_SHA}" }}
images:
  local:
    iso: nixos
    vmid_range: {{ first: 9100, last: 9109 }}
    hardware: {{ disk: 30G, storage: local-lvm }}
    nixos: {{ state_version: "24.05" }}
    build: {{ boot_wait: 1s, key_interval_ms: 0, address: {{ static: {{ address: 127.77.0.13/8, ssh_port: {port} }} }} }}
vms:
  c: {{ image: local, node: pve1, clone: linked }}
  d: {{ image: local, node: pve2, clone: linked }}
"#
    );
    let s = Scenario::with_options(ClusterSpec::with_nodes(2), &fleet, EMPTY_LOCK, opts);
    s.converge();
    let templates = &read_lock(&s).images["local"].generations[0].templates;
    assert_eq!(templates.len(), 2, "one build per node: {templates:?}");
    // The second build VM was created only after the first was a template.
    let journal = s.sim.journal();
    let at = |method: &str, route: &str, vmid: u32| {
        journal
            .iter()
            .position(|e| {
                e.method == method
                    && e.route == route
                    && e.params.get("vmid").map(String::as_str) == Some(&vmid.to_string())
            })
            .unwrap_or_else(|| panic!("no {method} {route} for {vmid}"))
    };
    let (first, second) = (templates[0].vmid.get(), templates[1].vmid.get());
    let (first, second) =
        if at("POST", "/nodes/{node}/qemu", first) < at("POST", "/nodes/{node}/qemu", second) {
            (first, second)
        } else {
            (second, first)
        };
    assert!(
        at("POST", "/nodes/{node}/qemu/{vmid}/template", first)
            < at("POST", "/nodes/{node}/qemu", second),
        "the builds overlapped"
    );
}

#[test]
fn a_static_build_whose_keys_always_arrive_wrong_fails_clearly() {
    let s = static_scenario("127.77.0.14/8", "");
    s.edit_fleet(|f| f.replace("access: 20s", "access: 3s"));
    s.fault("PUT /nodes/*/qemu/*/sendkey => wrong-key");
    apply_fails_cleanly(
        &s,
        &[
            "get SSH access to the installer: access: no SSH on the static build address 127.77.0.14",
            "(typed the access sequence ",
            "build.timeouts.access = 3s",
        ],
    );
}

#[test]
fn a_silent_guest_agent_fails_a_static_build_cleanly() {
    let s = static_scenario("127.77.0.11/8", ", reboot: 3s");
    s.fault("POST /nodes/*/qemu/*/agent/ping => agent-not-running");
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &out,
        &[
            "image.golden[pve]: FAILED at generation 1 (VMID 9400): 5/9 reboot into the installed system",
            "the installed system's guest agent did not answer: proxmox error (500): QEMU guest agent is not running",
            "build.timeouts.reboot = 3s",
        ],
    );
    assert!(s.sim.inspect(|st| !st.vms.contains_key(&9400)));
    assert!(read_lock(&s).images.is_empty());
    s.sim.options().faults.clear();
    s.converge();
}

#[test]
fn a_static_address_nobody_answers_on_is_a_clear_error() {
    // The guest listens on another port than the fleet says.
    let s = static_scenario("127.77.0.12/8", "");
    let listening = s.sim.options().guest_ssh_port;
    let elsewhere = free_port("127.77.0.12");
    s.edit_fleet(|f| {
        f.replace("access: 20s", "access: 3s").replace(
            &format!("ssh_port: {listening}"),
            &format!("ssh_port: {elsewhere}"),
        )
    });
    apply_fails_cleanly(
        &s,
        &[
            "get SSH access to the installer: access: no SSH on the static build address",
            "typed the access sequence",
        ],
    );
}

// ----- what NixOS does with the image ---------------------------------------
//
// The simulated guest evaluates the rendered configuration against facts
// read from nixpkgs (pve-sim's `nixos::facts`): NixOS's assertions fail
// `nixos-install` with their own text, and the installed system has only
// the programs and units NixOS would give it.

/// The build fleet with `fields` added to the image's `nixos`.
fn nixos_fleet(fields: &str) -> String {
    build_fleet("\"vim\"").replace(
        "packages: [\"vim\"] }",
        &format!("packages: [\"vim\"], {fields} }}"),
    )
}

/// Builds generation 1 of `fleet` and returns the sealed system.
fn build_and_seal(fleet: &str) -> pve_sim::guest::Installed {
    let s = Scenario::new(ClusterSpec::default(), fleet, EMPTY_LOCK);
    s.converge();
    assert_eq!(read_lock(&s).images["golden"].current, 1);
    s.sim
        .inspect(|st| st.vms[&9400].installed.clone())
        .expect("the template holds the installed system")
}

/// nixos/modules/services/system/cloud-init.nix puts cloud-init only on
/// the `path` of its own units, never in environment.systemPackages:
/// `cloud-init clean` exits 127 on NixOS. The seal removes cloud-init's
/// state by path instead, with or without cloud-init, agent on or off.
#[test]
fn sealing_works_with_and_without_cloud_init_and_the_guest_agent() {
    for (cloud_init, agent) in [(true, true), (false, true), (true, false), (false, false)] {
        let fleet = nixos_fleet(&format!("cloud_init: {cloud_init}, guest_agent: {agent}"));
        let sealed = build_and_seal(&fleet);
        assert!(
            sealed.cloud_init_clean
                && sealed.machine_id_empty
                && !sealed.host_keys
                && sealed.root_keys.is_empty(),
            "cloud_init={cloud_init} guest_agent={agent}: {sealed:?}"
        );
        assert!(
            !sealed.system.has_program("cloud-init"),
            "NixOS does not put cloud-init on PATH"
        );
    }
}

/// nixos/modules/tasks/network-interfaces-systemd.nix asserts
/// "networking.defaultGateway.interface is not optional when using
/// networkd": a static image network names its interface on the gateway.
#[test]
fn a_static_image_network_installs_with_networkd() {
    let fleet = nixos_fleet(
        "network: { interface: ens18, address: 192.168.1.250/24, gateway: 192.168.1.1, dns: [1.1.1.1] }",
    );
    let sealed = build_and_seal(&fleet);
    assert!(
        sealed
            .system
            .units
            .iter()
            .any(|u| u.name == "systemd-networkd"),
        "{sealed:?}"
    );
}

/// cloud-init's units are `Type=oneshot`: `activating` until cloud-init
/// exits, which can be after sshd answers (without an agent to wait for,
/// verify runs right after the reboot). Verify waits for them to finish
/// instead of failing a healthy image.
#[test]
fn verify_waits_for_oneshot_units_to_finish() {
    let mut opts = options();
    opts.units_settle = Duration::from_millis(2500);
    let fleet = nixos_fleet("guest_agent: false");
    let s = Scenario::with_options(ClusterSpec::default(), &fleet, EMPTY_LOCK, opts);
    s.converge();
    let history = s.sim.guests().history(9400);
    let checks = history
        .iter()
        .filter(|l| l.starts_with("ssh$ systemctl is-active"))
        .count();
    assert!(
        checks > 1,
        "verify asked again while cloud-init ran: {history:?}"
    );
}

/// A system whose cloud-init unit is switched off would give clones no
/// user, keys or network: verify fails it, naming the unit's state.
#[test]
fn verify_fails_an_image_whose_cloud_init_never_runs() {
    let s = Scenario::new(
        ClusterSpec::default(),
        &nixos_fleet("extra_config: \"systemd.services.cloud-init.enable = false;\""),
        EMPTY_LOCK,
    );
    apply_fails_cleanly(
        &s,
        &[
            "FAILED at generation 1 (VMID 9400): 6/9 verify the installed system",
            "verify services: cloud-init is inactive",
        ],
    );
}

/// nixos/modules/services/networking/ssh/sshd.nix: with
/// `startWhenNeeded` there is no sshd.service, only sshd.socket. A healthy
/// socket-activated image passes verification (its socket is checked).
#[test]
fn a_socket_activated_sshd_passes_verification() {
    let sealed = build_and_seal(&nixos_fleet(
        "extra_config: \"services.openssh.startWhenNeeded = true;\"",
    ));
    assert!(
        sealed.system.units.iter().any(|u| u.name == "sshd.socket")
            && !sealed.system.units.iter().any(|u| u.name == "sshd"),
        "{sealed:?}"
    );
}

/// Applies, expecting the build to fail with every needle in the report,
/// and to leave no build VM and no half-registered generation behind.
fn apply_fails_cleanly(s: &Scenario, needles: &[&str]) {
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(&out, needles);
    assert!(
        read_lock(s).images.is_empty(),
        "no half-registered generation"
    );
    assert!(
        s.sim.inspect(|st| !st.vms.contains_key(&9400)),
        "the build VM was cleaned up"
    );
}

/// Asserts that, in apply's progress (`stderr`), no change of `dag` shows
/// before every change it depends on has shown its last line: apply
/// started it only once they were done.
fn assert_starts_follow(dag: &[(String, Vec<String>)], stderr: &str) {
    let lines: Vec<(usize, &str)> = stderr
        .lines()
        .enumerate()
        .filter_map(|(i, l)| Some((i, l.split_once("] ")?.1.split_once(": ")?.0)))
        .collect();
    let first = |a: &str| lines.iter().find(|(_, x)| *x == a).map(|(i, _)| *i);
    let last = |a: &str| lines.iter().rev().find(|(_, x)| *x == a).map(|(i, _)| *i);
    for (address, deps) in dag {
        let Some(start) = first(address) else {
            continue;
        };
        for dep in deps {
            assert!(
                last(dep).is_some_and(|end| end < start),
                "{address} started before {dep} was done:\n{stderr}"
            );
        }
    }
}

/// Asserts that `text` contains every needle, showing the text otherwise.
fn assert_contains(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

// ----- permissions -------------------------------------------------------

/// The least-privilege role the README documents for nixgold.
const NIXGOLD_ROLE_PRIVS: &str = "Datastore.AllocateSpace,Datastore.AllocateTemplate,Datastore.Audit,Pool.Allocate,Pool.Audit,Sys.AccessNetwork,VM.Allocate,VM.Audit,VM.Clone,VM.Config.CDROM,VM.Config.CPU,VM.Config.Cloudinit,VM.Config.Disk,VM.Config.HWType,VM.Config.Memory,VM.Config.Network,VM.Config.Options,VM.Console,VM.GuestAgent.Audit,VM.PowerMgmt";

impl Scenario {
    /// Calls the API as root and returns `data`.
    fn api_data(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> serde_json::Value {
        let url = format!("{}/api2/json{path}", self.handle.as_ref().unwrap().url());
        self.rt.block_on(async {
            let r = reqwest::Client::new()
                .request(method, url)
                .form(form)
                .header("Authorization", format!("PVEAPIToken={TOKEN}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["data"].clone()
        })
    }

    /// A privilege-separated token of a new user `deploy@pve`, holding
    /// `role` on `/` (and so does the user): `user@realm!ci=secret`.
    fn deploy_token(&self, role: &str) -> String {
        use reqwest::Method;
        self.api_data(Method::POST, "/access/users", &[("userid", "deploy@pve")]);
        let made = self.api_data(Method::POST, "/access/users/deploy@pve/token/ci", &[]);
        for (who, id) in [("users", "deploy@pve"), ("tokens", "deploy@pve!ci")] {
            self.api_data(
                Method::PUT,
                "/access/acl",
                &[("path", "/"), ("roles", role), (who, id)],
            );
        }
        format!("deploy@pve!ci={}", made["value"].as_str().unwrap())
    }

    fn run_as(&self, token: &str, args: &[&str]) -> (i32, String, String) {
        let (code, out, err) = self.finish(self.command(args).env("PROXMOX_VE_API_TOKEN", token));
        let secret = token.rsplit('=').next().unwrap();
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "the token leaked"
        );
        (code, out, err)
    }
}

/// A privilege-separated token with the built-in PVEAuditor role can read
/// the cluster but change nothing: doctor names every missing privilege
/// with the `pveum` commands that grant it, and apply refuses before it
/// changes anything (pve-access-control `RPCEnvironment.pm`
/// `permissions`; the 403s never happen).
#[test]
fn an_auditor_token_gets_the_missing_privileges_named_and_changes_nothing() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    let token = s.deploy_token("PVEAuditor");
    let (code, out, err) = s.run_as(&token, &["doctor", "fleet.yaml"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &out,
        &[
            "ok   reached the API as deploy@pve!ci",
            "ok   bridge `vmbr0` exists on pve",
            "FAIL the token holds the privileges the fleet needs",
            "/vms/400: VM.Allocate, VM.Config.CPU,",
            "/vms/9400: VM.Allocate, VM.Clone,",
            "/storage/local: Datastore.AllocateTemplate",
            "/nodes/pve: Sys.AccessNetwork",
            "/pool/nixgold-lock-homelab: Pool.Allocate\n",
            &format!("pveum role add NixgoldDeploy --privs \"{NIXGOLD_ROLE_PRIVS}\""),
            "pveum acl modify /vms/400 --users deploy@pve --roles NixgoldDeploy",
            "pveum acl modify /vms/400 --tokens 'deploy@pve!ci' --roles NixgoldDeploy",
        ],
    );
    assert!(
        !out.contains("Datastore.Audit\n"),
        "auditors may audit: {out}"
    );
    let tasks = s.sim.inspect(|st| st.tasks.len());
    let before = s.sim.journal().len();
    let (code, out, err) = s.run_as(&token, &["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &err,
        &[
            "the API token lacks privileges this fleet needs",
            "nothing was changed",
        ],
    );
    assert_eq!(
        s.sim.inspect(|st| (st.vms.len(), st.tasks.len())),
        (0, tasks)
    );
    assert!(
        s.sim.journal()[before..].iter().all(|e| e.method == "GET"),
        "no write reached the cluster"
    );
}

/// With the README's least-privilege role (granted on `/` to the user and
/// its privilege-separated token) the whole job — ISO download, template
/// build, clone, start — applies and converges, and doctor is clean.
#[test]
fn the_documented_least_privilege_role_builds_and_converges() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    s.api_data(
        reqwest::Method::POST,
        "/access/roles",
        &[("roleid", "NixgoldDeploy"), ("privs", NIXGOLD_ROLE_PRIVS)],
    );
    let token = s.deploy_token("NixgoldDeploy");
    let (code, out, err) = s.run_as(&token, &["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = s.run_as(&token, &["plan", "fleet.yaml"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("No changes."), "{out}");
    let (code, out, err) = s.run_as(&token, &["doctor", "fleet.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(s.sim.inspect(|st| st.vms[&400].running));
}

/// doctor reads what the fleet names and fails on what is not there: a
/// bridge missing on the node, a storage without the content type it needs.
#[test]
fn doctor_names_a_missing_bridge_and_a_storage_without_images() {
    let mut cluster = single_node();
    cluster.nodes[0].bridges = vec!["vmbr1".into()];
    cluster
        .storages
        .iter_mut()
        .find(|s| s.id == "tank")
        .unwrap()
        .content = vec!["rootdir".into()];
    let s = Scenario::new(cluster, &base_fleet(WEB_01), &golden_lock());
    let (code, out, err) = s.run(&["doctor", "fleet.yaml"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &out,
        &[
            "FAIL bridge `vmbr0` exists on pve",
            "FAIL storage `tank` on pve holds images",
            "ok   storage `local` on pve holds iso",
            "ok   storage `local` on pve has 100 GiB free for installer ISOs (needs 2 GiB)",
            "ok   the token holds the privileges the fleet needs",
        ],
    );
}

// ----- one apply at a time (the apply lock) --------------------------------

/// A scenario whose VM start answers only after `ms`: an apply of it
/// holds the apply lock at least that long.
fn slow_start(ms: u64) -> Scenario {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    s.fault(&format!("POST /nodes/*/qemu/*/status/start => slow:{ms}*1"));
    s
}

fn output_of(child: std::process::Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn two_applies_started_together_one_runs_and_the_other_refuses_naming_the_holder() {
    let s = slow_start(3000);
    let spawn = || {
        s.command(&["apply", "fleet.yaml", "--auto-approve"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (pids, results) = ([a.id(), b.id()], [output_of(a), output_of(b)]);
    let winners: Vec<usize> = (0..2).filter(|i| results[*i].0 == 0).collect();
    assert_eq!(winners.len(), 1, "exactly one apply runs: {results:?}");
    let (winner, loser) = (winners[0], 1 - winners[0]);
    let (code, _, err) = &results[loser];
    assert_eq!(*code, 1);
    assert_contains(
        err,
        &[
            "fleet `homelab` is locked by another run:",
            &format!("(pid {}, `nixgold apply`) since ", pids[winner]),
            "--lock-timeout",
            "nixgold force-unlock ",
        ],
    );
    // The refused run changed nothing; the winner finished and let go.
    assert_eq!(
        s.sim.inspect(|st| st.vms.len()),
        2,
        "the template and web-01"
    );
    assert!(s.sim.inspect(|st| st.vms[&400].running));
    assert_eq!(s.lock_comment(), None, "released");
    let creates = s
        .sim
        .journal()
        .iter()
        .filter(|e| e.method == "POST" && e.route.ends_with("/clone"))
        .count();
    assert_eq!(creates, 1, "one clone, by the winner");
}

#[test]
fn an_apply_a_second_after_another_refuses_and_with_lock_timeout_waits_then_has_nothing_to_do() {
    let s = slow_start(6000);
    let first = s
        .command(&["apply", "fleet.yaml", "--auto-approve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = first.id();
    std::thread::sleep(Duration::from_secs(1));
    s.wait_for_request("/pools");
    let (code, _, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{err}");
    assert_contains(
        &err,
        &[
            "locked by another run: ",
            &format!("(pid {pid}, `nixgold apply`)"),
        ],
    );
    // plan does not need the lock, but says who holds it.
    let (_, _, err) = s.run(&["plan", "fleet.yaml"]);
    assert_contains(
        &err,
        &[
            "note: fleet `homelab` is being changed right now: locked by",
            &format!("(pid {pid}, "),
        ],
    );
    let (code, out, err) = s.run(&[
        "apply",
        "fleet.yaml",
        "--auto-approve",
        "--lock-timeout",
        "5m",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(&err, &["waiting up to 5m for the apply lock held by"]);
    assert!(out.starts_with("No changes."), "{out}");
    let (code, out, err) = output_of(first);
    assert_eq!(code, 0, "the first apply finished: {out}{err}");
    assert_eq!(
        s.sim.inspect(|st| st.vms.len()),
        2,
        "the template and web-01"
    );
}

#[test]
fn a_killed_applys_lock_is_broken_by_force_unlock_and_an_expired_lease_by_the_next_run() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let pid = s.apply_killed_while_starting();
    // The dead run's lock stays until its lease runs out.
    let (code, _, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1);
    let id = s.lock_id();
    assert_contains(
        &err,
        &[
            &format!("(pid {pid}, `nixgold apply`)"),
            &format!("lock ID {id}, lease until "),
            &format!("`nixgold force-unlock {id}` breaks the lock"),
        ],
    );
    // rollback takes the lock too; drift only reports it.
    let (code, _, err) = s.run(&["rollback", "fleet.yaml", "--image", "golden"]);
    assert_eq!(code, 1);
    assert_contains(&err, &["fleet `homelab` is locked by another run:"]);
    let (_, _, err) = s.run(&["drift", "fleet.yaml"]);
    assert_contains(
        &err,
        &["note: fleet `homelab` is being changed right now: locked by"],
    );
    // The wrong ID breaks nothing.
    let (code, _, err) = s.run(&["force-unlock", "0000000000000000", "fleet.yaml"]);
    assert_eq!(code, 1);
    assert_contains(
        &err,
        &[&format!("is locked under ID {id}, not 0000000000000000")],
    );
    let (code, out, err) = s.run(&["force-unlock", &id, "fleet.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert_contains(&out, &["fleet `homelab`: broke the apply lock of"]);
    assert_eq!(s.lock_comment(), None);
    s.converge();
    // A lease that ran out (a holder that crashed elsewhere) is broken by
    // the next run, which says so.
    s.api(
        "POST",
        "/pools",
        &[
            ("poolid", "nixgold-lock-homelab"),
            (
                "comment",
                "nixgold-apply-lock id=00112233aabbccdd user=ci host=runner-7 pid=4242 command=apply since=2026-01-01T10:00:00Z expires=2026-01-01T10:05:00Z",
            ),
        ],
    );
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(
        &err,
        &[
            "breaking the expired apply lock of ci@runner-7 (pid 4242, `nixgold apply`) since 2026-01-01T10:00:00Z",
        ],
    );
    assert_eq!(s.lock_comment(), None);
    // A pool of that name that is not a nixgold lock is never taken over.
    s.api(
        "POST",
        "/pools",
        &[("poolid", "nixgold-lock-homelab"), ("comment", "team pool")],
    );
    let (code, _, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1);
    assert_contains(
        &err,
        &["the pool `nixgold-lock-homelab` exists but is not a nixgold apply lock"],
    );
    assert_eq!(s.lock_comment().as_deref(), Some("team pool"));
}

// ----- saved plans that cannot be forged -----------------------------------

#[test]
fn a_saved_plan_edited_to_another_vmid_other_settings_or_a_destroy_is_refused() {
    let s = Scenario::new(
        with_foreign_vm(single_node(), 500),
        &base_fleet(WEB_01),
        &golden_lock(),
    );
    s.converge();
    s.edit_fleet(|f| f.replace("tags: [prod]", "tags: [prod, web]"));
    let (code, _, err) = s.run(&["plan", "fleet.yaml", "--out", "web.plan"]);
    assert_eq!(code, 0, "{err}");
    let path = s.dir.path().join("web.plan");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(original["plan"]["changes"][0]["address"], "vm.web-01");
    type Forge = fn(&mut serde_json::Value);
    let forgeries: [(&str, Forge); 3] = [
        ("another VMID", |c| c["work"]["vmid"] = 500.into()),
        ("other settings", |c| {
            c["work"]["set"]["memory"] = "65536".into();
            c["work"]["set"]["args"] = "-no-reboot".into();
        }),
        ("a destroy", |c| {
            c["action"] = "destroy".into();
            c["work"] = serde_json::json!({ "kind": "destroy_vm", "vmid": 400, "node": "pve" });
        }),
    ];
    let before = (s.config(400), s.config(500));
    let lock = std::fs::read_to_string(s.dir.path().join("fleet.lock")).unwrap();
    for (what, forge) in forgeries {
        let mut edited = original.clone();
        forge(&mut edited["plan"]["changes"][0]);
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        let (code, out, err) = s.run(&["apply", "web.plan"]);
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert_contains(
            &err,
            &[
                "refusing the saved plan: change `vm.web-01` (",
                "Nothing was changed.",
            ],
        );
        assert_eq!(
            (s.config(400), s.config(500)),
            before,
            "{what}: nothing changed"
        );
        assert_eq!(
            std::fs::read_to_string(s.dir.path().join("fleet.lock")).unwrap(),
            lock
        );
    }
    // A change added to the plan is refused too, named.
    let mut edited = original.clone();
    let mut extra = edited["plan"]["changes"][0].clone();
    extra["address"] = "vm.intruder".into();
    edited["plan"]["changes"]
        .as_array_mut()
        .unwrap()
        .push(extra);
    std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
    let (code, _, err) = s.run(&["apply", "web.plan"]);
    assert_eq!(code, 1);
    assert_contains(
        &err,
        &[
            "change `vm.intruder` (update) is not justified by the fleet, the lockfile and the cluster",
        ],
    );
    // A plan saved by a nixgold before the plan was a DAG (format 1, no
    // `depends_on`) is refused as another version's, not as malformed.
    let mut older = original.clone();
    older["format"] = "nixgold-plan/1".into();
    for change in older["plan"]["changes"].as_array_mut().unwrap() {
        change.as_object_mut().unwrap().remove("depends_on");
    }
    std::fs::write(&path, serde_json::to_string_pretty(&older).unwrap()).unwrap();
    let (code, _, err) = s.run(&["apply", "web.plan"]);
    assert_eq!(code, 1);
    assert_contains(
        &err,
        &[
            "web.plan is a saved plan of another nixgold version (nixgold-plan/1; this one reads nixgold-plan/2)",
            "hint: run `nixgold plan --out` again with this nixgold",
        ],
    );
    // The plan as saved applies.
    std::fs::write(&path, serde_json::to_string_pretty(&original).unwrap()).unwrap();
    let (code, out, err) = s.run(&["apply", "web.plan"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(s.config(400)["tags"].contains("web"), "{:?}", s.config(400));
    assert_eq!(s.config(500), before.1);
}

// ----- never touch what is not ours ----------------------------------------

#[test]
fn a_foreign_vm_created_at_the_builds_vmid_mid_apply_survives_and_the_build_fails_cleanly() {
    let s = Scenario::new(
        with_foreign_vm(ClusterSpec::default(), 500),
        &build_fleet("\"vim\""),
        EMPTY_LOCK,
    );
    // The build VM's create reaches Proxmox late; just before it does,
    // someone clones their VM to the VMID the plan gave the build.
    s.fault("POST /nodes/*/qemu => slow:3000*1");
    let child = s
        .command(&["apply", "fleet.yaml", "--auto-approve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_for_request("/download-url");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.sim.inspect(|st| {
        st.tasks
            .values()
            .any(|t| t.kind == "download" && t.exitstatus.is_none())
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the download never ended"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    s.api(
        "POST",
        "/nodes/pve/qemu/500/clone",
        &[("newid", "9400"), ("name", "someone-elses")],
    );
    let (code, out, err) = output_of(child);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(&out, &["image.golden[pve]: FAILED", "already exists"]);
    assert_contains(
        &format!("{out}{err}"),
        &[
            "VMID 9400 on pve is not the VM the plan meant (",
            "not stamped by nixgold); nixgold left it alone",
        ],
    );
    assert_eq!(
        s.config(9400).get("name").map(String::as_str),
        Some("someone-elses"),
        "the foreign VM survives"
    );
    assert!(read_lock(&s).images.is_empty(), "no generation recorded");
    assert!(
        s.sim.inspect(|st| !st.vms.contains_key(&400)),
        "no clone of a build that failed"
    );
}

// ----- files keep the mode their readers need --------------------------------

#[cfg(unix)]
#[test]
fn a_rewritten_lockfile_keeps_its_mode_and_the_prometheus_file_is_0644() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let lock = s.dir.path().join("fleet.lock");
    for (i, wanted) in [0o644, 0o640].into_iter().enumerate() {
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(wanted)).unwrap();
        let before = std::fs::read_to_string(&lock).unwrap();
        // A new VM gets a VMID: the plan rewrites the lockfile.
        s.edit_fleet(|f| format!("{f}  extra-{i}:\n    image: golden\n"));
        s.plan();
        assert_ne!(std::fs::read_to_string(&lock).unwrap(), before, "rewritten");
        assert_eq!(mode(&lock), wanted, "the lockfile kept mode {wanted:o}");
    }
    let (code, out, err) = s.run(&["drift", "fleet.yaml", "--prometheus", "drift.prom"]);
    assert!(code == 0 || code == 2, "{out}{err}");
    assert_eq!(
        mode(&s.dir.path().join("drift.prom")),
        0o644,
        "node_exporter can read it"
    );
}

#[test]
fn lock_timeouts_on_the_template_conversions_writes_are_retried_and_the_build_is_kept() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    // A backup or another task holds the VM's config lock when the build
    // swaps the ISO for the cloud-init drive, and again at the conversion.
    s.fault("PUT /nodes/*/qemu/*/config => lock-timeout*1");
    s.fault("POST /nodes/*/qemu/*/template => lock-timeout*1");
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(
        &err,
        &[
            "detach the ISO: lock contention: can't lock file '/var/lock/qemu-server/lock-9400.conf' - got timeout; retrying",
            "convert to a template: task ",
        ],
    );
    assert_eq!(s.config(9400)["template"], "1");
    let lock = read_lock(&s);
    assert_eq!(lock.images["golden"].current, 1, "the generation was kept");
    let (code, text) = s.plan();
    assert_eq!(code, 0, "{text}");
}

#[test]
fn a_clone_still_running_after_a_kill_is_reported_as_in_progress_not_foreign() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    s.fault("POST /nodes/*/qemu/*/clone => task-hang*1");
    let mut child = s
        .command(&["apply", "fleet.yaml", "--auto-approve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    s.wait_for_request("/clone");
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(
        s.config(400).get("lock").map(String::as_str),
        Some("clone"),
        "the clone is still running in Proxmox"
    );
    let (code, out, err) = s.run(&["plan", "fleet.yaml"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &err,
        &["vm.web-01: VMID 400 on pve is a clone in progress (lock: clone) — wait or re-run"],
    );
    assert!(!err.contains("does not own"), "{err}");
}

#[test]
fn a_hung_start_is_reported_at_the_fleets_task_deadline_or_the_flags() {
    let fleet = base_fleet(WEB_01).replace("isos:\n", "task_timeout: 3s\nisos:\n");
    let s = Scenario::new(single_node(), &fleet, &golden_lock());
    s.fault("POST /nodes/*/qemu/*/status/start => task-hang*2");
    let started = std::time::Instant::now();
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &out,
        &[
            "vm.web-01: FAILED at start: the qmstart task of VM 400 on pve (UPID:pve:",
            "the deadline is task_timeout or --task-timeout; its log ",
            "did not finish within 3s",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "reported at the deadline"
    );
    s.stop_running_task("qmstart");
    // The flag overrides the fleet.
    let (code, out, err) = s.run(&[
        "apply",
        "fleet.yaml",
        "--auto-approve",
        "--task-timeout",
        "1s",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &out,
        &[
            "vm.web-01: FAILED at start: the qmstart task of VM 400",
            "did not finish within 1s",
        ],
    );
}

#[test]
fn a_changed_iso_pin_downloads_and_verifies_a_new_file_before_a_build_uses_it() {
    let s = Scenario::new(ClusterSpec::default(), &build_fleet("\"vim\""), EMPTY_LOCK);
    s.converge();
    let old_file = format!(
        "local:iso/nixos-minimal-24.05-x86_64-linux.{}.iso",
        &ISO_SHA[..16]
    );
    let has = |volid: &str| {
        s.sim
            .inspect(|st| st.volumes.values().any(|v| v.volid == volid))
    };
    assert!(has(&old_file), "the ISO's file name carries its checksum");
    // The pin moves (a new release behind the same URL, or an edited
    // checksum) while the server still has the old file.
    let moved = "7e1d9b0c2a4f6e8d0b2c4a6e8f0d2b4c6a8e0f2d4b6c8a0e2f4d6b8c0a2e4f6d";
    s.edit_fleet(|f| f.replace(ISO_SHA, moved));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "+ iso.nixos[pve]",
            &format!("nixos-minimal-24.05-x86_64-linux.{}.iso", &moved[..16]),
            "+ image.golden[pve]",
        ],
    );
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_contains(
        &out,
        &[
            "iso.nixos[pve]: FAILED",
            &format!("checksum mismatch: got '{ISO_SHA}' != expect '{moved}'"),
            "image.golden[pve]: skipped (iso.nixos[pve] failed)",
        ],
    );
    let lock = read_lock(&s);
    assert_eq!(
        lock.images["golden"].current, 1,
        "no generation from an unverified ISO"
    );
    assert_eq!(lock.images["golden"].generations.len(), 1);
    assert!(has(&old_file), "the old file is left alone");
}

// ----- drift inside the guest ---------------------------------------------

/// What the simulated `nixos-24.05` channel serves after the build: a newer
/// point release, which `nixos-rebuild switch --upgrade` moves to.
const NEWER_24_05: &str = "24.05.5678.f00dfeed";

/// Two VMs cloned from a built generation 1, on a channel that moved on.
fn two_built_vms() -> Scenario {
    let web_02 = "  web-02:\n    image: golden\n    vmid: 401\n";
    let fleet = build_fleet("\"vim\"").replace("vms:\n", &format!("vms:\n{web_02}"));
    let mut opts = options();
    opts.channel_releases
        .insert("24.05".into(), NEWER_24_05.into());
    let s = Scenario::with_options(ClusterSpec::default(), &fleet, EMPTY_LOCK, opts);
    s.converge();
    s
}

/// `nixos-rebuild switch --upgrade` inside a VM — the everyday way a NixOS
/// machine drifts — is drift of its own kind: drift exits 2 and names the
/// VM with what it runs and what its generation installed, in text, JSON
/// and the Prometheus textfile. The other VM is in sync, checked through
/// both layers (get-osinfo and, with a root token, `agent/exec`).
#[test]
fn a_nixos_rebuild_inside_a_vm_is_drift_of_its_own_kind() {
    let s = two_built_vms();
    let (code, out, err) = s.run(&["drift", "fleet.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(
        &out,
        &["Inside the guests: 2 VM(s) run what their generation installed."],
    );
    let installed = read_lock(&s).images["golden"].generations[0].clone();
    s.api(
        "POST",
        "/nodes/pve/qemu/400/agent/exec",
        &[
            ("command", "nixos-rebuild"),
            ("command", "switch"),
            ("command", "--upgrade"),
        ],
    );
    let (code, out, err) = s.run(&["drift", "fleet.yaml", "--prometheus", "drift.prom"]);
    assert_eq!(code, 2, "{out}{err}");
    let running = s
        .sim
        .inspect(|st| st.vms[&400].installed.clone().unwrap().system_path);
    assert!(running.ends_with(&format!("-nixos-system-nixos-{NEWER_24_05}")));
    assert_contains(
        &out,
        &[
            "Drift inside the guests: NixOS moved on by itself",
            &format!(
                "  vm.web-01: runs NixOS {NEWER_24_05} ({running}); image.golden generation 1 installed 24.05 ({})",
                installed.system_path
            ),
            "Inside the guests: 1 VM(s) run what their generation installed.",
            "1 guest moved, 0 not inspectable.",
        ],
    );
    assert!(
        !out.contains("apply would change"),
        "apply does not undo a rebuild inside: {out}"
    );
    let prom = std::fs::read_to_string(s.dir.path().join("drift.prom")).unwrap();
    assert_contains(
        &prom,
        &[
            "nixgold_drift_detected{fleet=\"homelab\"} 1",
            "nixgold_drift_resources{fleet=\"homelab\",kind=\"guest_moved\"} 1",
            &format!(
                "nixgold_drift_guest_moved{{fleet=\"homelab\",address=\"vm.web-01\",running=\"{NEWER_24_05}\",installed=\"24.05\"}} 1"
            ),
            "nixgold_drift_guests_in_sync{fleet=\"homelab\"} 1",
        ],
    );
    let (code, json, _) = s.run(&["drift", "fleet.yaml", "--json"]);
    assert_eq!(code, 2);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let moved: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "guest_moved")
        .collect();
    assert_eq!(moved.len(), 1, "{json}");
    assert_eq!(moved[0]["address"], "vm.web-01");
    assert_eq!(moved[0]["guest"]["running_version"], NEWER_24_05);
    assert_eq!(moved[0]["guest"]["running_system"], running.as_str());
    assert_eq!(moved[0]["guest"]["installed_version"], "24.05");
}

/// A VM whose guest cannot be looked into is reported as not inspectable
/// and never counted in sync. A token with VM.GuestAgent.Audit but not
/// Unrestricted (the README's role) still compares the release through
/// get-osinfo (PVE 9.1's apidoc.json: `agent/get-osinfo` checks
/// `VM.GuestAgent.Audit` or `.Unrestricted`, `agent/exec` only the latter).
#[test]
fn a_vm_without_an_answering_agent_is_not_inspectable() {
    let s = two_built_vms();
    s.fault("GET /nodes/*/qemu/401/agent/get-osinfo => agent-not-running*1");
    let (code, out, err) = s.run(&["drift", "fleet.yaml", "--prometheus", "drift.prom"]);
    assert_eq!(code, 0, "not inspectable is not drift: {out}{err}");
    assert_contains(
        &out,
        &[
            "VMs nixgold cannot look inside (not inspectable, so not known to be in sync):\n  vm.web-02: get-osinfo: ",
            "QEMU guest agent is not running",
            "Inside the guests: 1 VM(s) run what their generation installed.",
            "0 guest moved, 1 not inspectable.",
        ],
    );
    let prom = std::fs::read_to_string(s.dir.path().join("drift.prom")).unwrap();
    assert_contains(
        &prom,
        &[
            "nixgold_drift_resource{fleet=\"homelab\",kind=\"not_inspectable\",address=\"vm.web-02\"} 1",
        ],
    );
    s.api_data(
        reqwest::Method::POST,
        "/access/roles",
        &[("roleid", "NixgoldDeploy"), ("privs", NIXGOLD_ROLE_PRIVS)],
    );
    let token = s.deploy_token("NixgoldDeploy");
    let (code, out, err) = s.run_as(&token, &["drift", "fleet.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(
        &out,
        &[
            "Inside the guests: 2 VM(s) run what their generation installed (2 compared by release only: the token lacks VM.GuestAgent.Unrestricted to read the system path).",
        ],
    );
}

// ----- the quarterly cycle ------------------------------------------------

/// Runs `nixgold cycle` with the plan kept in `cycle.plan` and the
/// textfile in `cycle.prom`; (exit code, textfile).
fn cycle(s: &Scenario, apply: bool) -> (i32, String) {
    let mut args = vec![
        "cycle",
        "fleet.yaml",
        "--plan-out",
        "cycle.plan",
        "--prometheus",
        "cycle.prom",
    ];
    if apply {
        args.push("--apply");
    }
    let (code, out, err) = s.run(&args);
    let prom = std::fs::read_to_string(s.dir.path().join("cycle.prom")).unwrap();
    assert!(code != 1 || prom.contains("_success{fleet="), "{out}{err}");
    (code, prom)
}

/// The quarterly cycle unattended: with nothing new it does nothing; with
/// a new generation due and no opt-in the plan waits (exit 2, kept for
/// people); with `--apply` generation 2 is built and the VM that follows
/// new generations is rolled out to it behind its gate; the next cycle
/// retires generation 1
/// (beyond `keep`), and drift is clean. A step that fails exits 1 and says
/// so in the textfile.
#[test]
fn the_quarterly_cycle_waits_without_opt_in_applies_with_it_and_retires_the_old_generation() {
    let replace = |packages: &str| {
        keep_one(packages)
            .replace(
                "    onboot: true\n",
                "    onboot: true\n    on_new_generation: replace\n",
            )
            .replace(
                "vms:\n",
                "rollout: { batch: { percent: 50 }, gates: { agent: { timeout: 5s } } }\nvms:\n",
            )
    };
    let s = Scenario::new(ClusterSpec::default(), &replace("\"vim\""), EMPTY_LOCK);
    s.converge();
    let (code, prom) = cycle(&s, true);
    assert_eq!(code, 0, "nothing to do");
    assert_contains(&prom, &["nixgold_cycle_success{fleet=\"homelab\"} 1"]);

    s.set_fleet(&replace("\"vim\", \"htop\""));
    let (code, prom) = cycle(&s, false);
    assert_eq!(code, 2, "the plan waits for a person");
    assert_contains(
        &prom,
        &[
            "nixgold_cycle_success{fleet=\"homelab\"} 1",
            "nixgold_cycle_changes_waiting{fleet=\"homelab\"} 1",
        ],
    );
    let (code, shown, _) = s.run(&["show", "cycle.plan"]);
    assert_eq!(code, 0);
    assert_contains(&shown, &["build generation 2", "  batch 1: vm.web-01\n"]);
    assert!(
        s.sim.inspect(|st| !st.vms.contains_key(&9401)),
        "nothing was applied"
    );

    let (code, _) = cycle(&s, true);
    assert_eq!(code, 0);
    assert_eq!(read_lock(&s).images["golden"].current, 2);
    let (code, _) = cycle(&s, true);
    assert_eq!(code, 0, "the second cycle retires generation 1");
    let numbers: Vec<u32> = read_lock(&s).images["golden"]
        .generations
        .iter()
        .map(|g| g.number)
        .collect();
    assert_eq!(numbers, [2]);
    let (code, out, err) = s.run(&["drift", "fleet.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(
        &out,
        &["Inside the guests: 1 VM(s) run what their generation installed."],
    );

    s.set_fleet("fleet: [not a fleet\n");
    let (code, prom) = cycle(&s, true);
    assert_eq!(code, 1);
    assert_contains(
        &prom,
        &[
            "nixgold_cycle_success{fleet=\"fleet\"} 0",
            "nixgold_cycle_failed_step{fleet=\"fleet\",step=\"update\"} 1",
        ],
    );
}

/// The units pass secrets as systemd credentials: a variable the fleet
/// reads (`{ env: WEB_PASSWORD }`, `PROXMOX_VE_API_TOKEN`) may instead be
/// a file named by `NAME_FILE` (`%d/NAME` in a unit), read without its
/// final newline and never printed.
#[test]
fn secrets_come_from_the_files_name_file_points_at() {
    let s = Scenario::new(single_node(), &base_fleet(WEB_01), &golden_lock());
    let token = s.dir.path().join("token");
    let password = s.dir.path().join("password");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let mut cmd = s.command(&["apply", "fleet.yaml", "--auto-approve"]);
    cmd.env_remove("PROXMOX_VE_API_TOKEN")
        .env_remove("WEB_PASSWORD")
        .env("PROXMOX_VE_API_TOKEN_FILE", &token)
        .env("WEB_PASSWORD_FILE", &password);
    let (code, out, err) = s.finish(&mut cmd);
    assert_eq!(code, 0, "{out}{err}");
    assert!(s.config(400).contains_key("cipassword"));
    let mut cmd = s.command(&["plan", "fleet.yaml"]);
    cmd.env_remove("PROXMOX_VE_API_TOKEN")
        .env("PROXMOX_VE_API_TOKEN_FILE", s.dir.path().join("missing"));
    let (code, _, err) = s.finish(&mut cmd);
    assert_eq!(code, 1);
    assert_contains(&err, &["PROXMOX_VE_API_TOKEN_FILE", "cannot read"]);
}

// ----- rollouts -------------------------------------------------------------

/// Six VMs that follow new generations, rolled out two at a time behind
/// the guest-agent gate; `extra` goes into each VM.
fn rollout_fleet(packages: &str, extra: &str) -> String {
    let vms: String = (1..=6)
        .map(|i| format!("  app-0{i}:\n    image: golden\n    vmid: {}\n    on_new_generation: replace\n{extra}", 400 + i))
        .collect();
    let fleet = keep_one(packages);
    let at = fleet.find("vms:\n").unwrap();
    format!(
        "{}rollout: {{ batch: {{ count: 2 }}, gates: {{ agent: {{ timeout: 2s }} }} }}\nvms:\n{vms}",
        &fleet[..at]
    )
}

/// The generation each VM runs, from its stamp.
fn generations(s: &Scenario) -> Vec<String> {
    (401..=406)
        .map(|vmid| {
            let stamp = s.config(vmid)["description"].clone();
            stamp
                .split_whitespace()
                .find_map(|w| w.strip_prefix("generation="))
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The VMIDs apply destroyed, in order.
fn destroyed(s: &Scenario) -> Vec<String> {
    s.sim
        .journal()
        .iter()
        .filter(|e| e.method == "DELETE" && e.route == "/nodes/{node}/qemu/{vmid}")
        .map(|e| e.params["vmid"].clone())
        .collect()
}

/// Six VMs in batches of two: the plan shows three batches, apply replaces
/// them in that order — each batch only after the previous one's agents
/// answered — and a replaced VM keeps its VMID, name and MAC address.
#[test]
fn a_rollout_replaces_six_vms_two_at_a_time_in_plan_order() {
    let s = Scenario::new(
        ClusterSpec::default(),
        &rollout_fleet("\"vim\"", ""),
        EMPTY_LOCK,
    );
    s.converge();
    let macs: Vec<String> = (401..=406).map(|v| s.config(v)["net0"].clone()).collect();
    s.set_fleet(&rollout_fleet("\"vim\", \"htop\"", ""));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "Rollout: 3 batches of the VMs that follow new generations, each behind its gates (guest agent (2s)):",
            "  batch 1: vm.app-01, vm.app-02\n  batch 2: vm.app-03, vm.app-04\n  batch 3: vm.app-05, vm.app-06\n",
        ],
    );
    // `plan --json` carries the same batches for programs.
    let (code, out, err) = s.run(&["--json", "plan", "fleet.yaml"]);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        plan["nixgold"]["rollout"]["batches"],
        serde_json::json!([
            ["vm.app-01", "vm.app-02"],
            ["vm.app-03", "vm.app-04"],
            ["vm.app-05", "vm.app-06"]
        ])
    );
    assert_eq!(
        plan["nixgold"]["rollout"]["gates"]["agent"]["timeout"],
        "2s"
    );
    s.apply();
    assert_eq!(generations(&s), ["2"; 6]);
    // keep = 1: generation 1's template retires in the same apply, once
    // generation 2 is recorded (full clones do not hold it).
    let order: Vec<String> = destroyed(&s);
    assert!(order.contains(&"9400".to_owned()), "{order:?}");
    let order: Vec<String> = order.into_iter().filter(|v| v != "9400").collect();
    assert_eq!(order.len(), 6, "{order:?}");
    let batch_of = |vmid: &str| (vmid.parse::<u32>().unwrap() - 401) / 2;
    assert!(
        order.windows(2).all(|w| batch_of(&w[0]) <= batch_of(&w[1])),
        "batches in order: {order:?}"
    );
    // Each batch's agents were asked before the next batch was destroyed.
    let journal = s.sim.journal();
    let first_destroy_of_batch_2 = journal
        .iter()
        .position(|e| {
            e.method == "DELETE"
                && ["403", "404"].contains(&e.params.get("vmid").map_or("", String::as_str))
        })
        .unwrap();
    let pinged: Vec<&str> = journal[..first_destroy_of_batch_2]
        .iter()
        .filter(|e| e.route.ends_with("/agent/ping"))
        .map(|e| e.params["vmid"].as_str())
        .collect();
    assert!(
        pinged.contains(&"401") && pinged.contains(&"402"),
        "{pinged:?}"
    );
    let now: Vec<String> = (401..=406).map(|v| s.config(v)["net0"].clone()).collect();
    assert_eq!(now, macs, "the MAC addresses are kept");
    assert_eq!(s.config(401)["name"], "app-01");
    let (code, text) = s.plan();
    assert_eq!(code, 0, "converged in one apply: {text}");
}

/// An agent that stops answering after batch 1: the rollout stops, the four
/// VMs not yet replaced stay on generation 1 and are reported; once the
/// fault clears, the next apply finishes the rollout.
#[test]
fn a_failing_gate_stops_the_rollout_and_the_next_apply_resumes_it() {
    let s = Scenario::new(
        ClusterSpec::default(),
        &rollout_fleet("\"vim\"", ""),
        EMPTY_LOCK,
    );
    s.converge();
    s.set_fleet(&rollout_fleet("\"vim\", \"htop\"", ""));
    s.fault("POST /nodes/*/qemu/402/agent/ping => agent-not-running");
    let (code, out, err) = s.run(&["apply", "fleet.yaml", "--auto-approve"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(generations(&s), ["2", "2", "1", "1", "1", "1"]);
    let all = format!("{out}{err}");
    assert_contains(
        &all,
        &[
            "the guest agent did not answer within 2s",
            "the rollout stopped at batch 1: vm.app-02 failed its health gate",
        ],
    );
    for vm in ["vm.app-03", "vm.app-04", "vm.app-05", "vm.app-06"] {
        assert!(
            all.lines()
                .any(|l| l.contains(vm) && l.contains("the rollout stopped")),
            "{vm} is reported:\n{all}"
        );
    }
    s.sim.options().faults.clear();
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &["  batch 1: vm.app-03, vm.app-04\n  batch 2: vm.app-05, vm.app-06\n"],
    );
    s.apply();
    assert_eq!(generations(&s), ["2"; 6]);
}

/// A VM that follows new generations but is marked prevent_destroy is
/// never replaced: it stays on its generation, with a note.
#[test]
fn a_prevent_destroy_vm_is_skipped_by_the_rollout_with_a_note() {
    let fleet = |packages: &str| {
        rollout_fleet(packages, "").replace(
            "    vmid: 406\n    on_new_generation: replace\n",
            "    vmid: 406\n    on_new_generation: replace\n    prevent_destroy: true\n",
        )
    };
    let s = Scenario::new(ClusterSpec::default(), &fleet("\"vim\""), EMPTY_LOCK);
    s.converge();
    s.set_fleet(&fleet("\"vim\", \"htop\""));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "  batch 3: vm.app-05\n",
            "Note: vm.app-06 stays on image.golden generation 1: it follows new generations, but prevent_destroy keeps it from being replaced (generation 2 is current)",
        ],
    );
    s.apply();
    assert_eq!(generations(&s), ["2", "2", "2", "2", "2", "1"]);
}

// ----- import: adopting what exists (issue 16) ---------------------------

/// The fleet that describes the hand-made template 9000 and VM 101 of
/// [`hand_made_cluster`] (what `init --from-cluster` writes for them).
fn adopted_fleet(vm_extra: &str) -> String {
    format!(
        r#"fleet: homelab
proxmox:
  endpoint: https://pve.example.invalid:8006
  nodes: [pve]
  token: {{ env: PROXMOX_VE_API_TOKEN }}
isos:
  nixos: {{ url: "{ISO_URL}", checksum: "sha256:{ISO_SHA}" }}
images:
  golden:
    iso: nixos
    vmid_range: {{ first: 9000, last: 9009 }}
    hardware: {{ cores: 2, memory: 2048, disk: 30G, storage: tank }}
    nixos: {{ state_version: "24.05" }}
{BUILD}vms:
  web-01:
    image: golden
    vmid: 101
    clone: linked
    cores: 2
    memory: 2048
    network: {{ ip: 192.168.1.130/24, gateway: 192.168.1.1 }}
    user: ops
    tags: [prod]
    description: web server
    onboot: true
{vm_extra}"#
    )
}

impl Scenario {
    /// Sends one API request as a user would (curl, Terraform); waits for
    /// the task it starts. Returns `data`.
    fn api_call(&self, method: &str, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
        let base = self.handle.as_ref().unwrap().url();
        let auth = format!("PVEAPIToken={TOKEN}");
        self.rt.block_on(async {
            let c = reqwest::Client::new();
            let url = format!("{base}/api2/json{path}");
            let req = match method {
                "PUT" => c.put(url).form(form),
                "GET" => c.get(url),
                _ => c.post(url).form(form),
            };
            let r = req.header("Authorization", &auth).send().await.unwrap();
            assert_eq!(
                r.status(),
                200,
                "{method} {path}: {}",
                r.text().await.unwrap()
            );
            let data = r.json::<serde_json::Value>().await.unwrap()["data"].clone();
            let Some(upid) = data.as_str().filter(|d| d.starts_with("UPID:")) else {
                return data;
            };
            let status = format!("{base}/api2/json/nodes/pve/tasks/{}/status", percent(upid));
            loop {
                let s: serde_json::Value = c
                    .get(&status)
                    .header("Authorization", &auth)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if s["data"]["status"] == "stopped" {
                    assert_eq!(s["data"]["exitstatus"], "OK", "{method} {path}: {s}");
                    return data;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    /// Creates template 9000 and its running linked clone 101 by plain API
    /// calls, as Packer and Terraform leave them.
    fn hand_made_cluster(&self, root_disk: &str) {
        self.api_call(
            "POST",
            "/nodes/pve/qemu",
            &[
                ("vmid", "9000"),
                ("name", "nixos-golden"),
                ("memory", "2048"),
                ("cores", "2"),
                (root_disk, "tank:30"),
                ("ide2", "tank:cloudinit"),
                ("net0", "virtio,bridge=vmbr0"),
                ("agent", "1"),
                ("description", "built by packer"),
            ],
        );
        self.api_call("POST", "/nodes/pve/qemu/9000/template", &[]);
        self.api_call(
            "POST",
            "/nodes/pve/qemu/9000/clone",
            &[("newid", "101"), ("name", "web-01"), ("full", "0")],
        );
        self.api_call(
            "PUT",
            "/nodes/pve/qemu/101/config",
            &[
                ("ipconfig0", "ip=192.168.1.130/24,gw=192.168.1.1"),
                ("ciuser", "ops"),
                ("tags", "prod"),
                ("onboot", "1"),
                ("description", "web server"),
            ],
        );
        self.api_call("POST", "/nodes/pve/qemu/101/status/start", &[]);
    }

    fn import(&self, address: &str, vmid: &str) -> (i32, String, String) {
        self.run(&["import", "fleet.yaml", address, vmid])
    }
}

/// What must not change when a VM is adopted: its disks, MAC and boot.
fn identity(s: &Scenario, vmid: u32) -> (String, String, u64) {
    let config = s.config(vmid);
    let started = s.sim.inspect(|st| st.vms[&vmid].started_ms);
    (config["scsi0"].clone(), config["net0"].clone(), started)
}

#[test]
fn init_from_cluster_then_import_adopts_hand_made_vms_without_touching_them() {
    let s = Scenario::new(ClusterSpec::default(), &adopted_fleet(""), EMPTY_LOCK);
    s.hand_made_cluster("scsi0");
    let before = identity(&s, 101);

    // Without an import the VMID is foreign, as before.
    let (code, _, stderr) = s.run(&["plan", "fleet.yaml"]);
    assert_eq!(code, 1, "{stderr}");
    assert_contains(
        &stderr,
        &["VMID 9000 is taken by a VM nixgold does not own"],
    );

    let (code, stdout, stderr) = s.run(&[
        "init",
        "--from-cluster",
        "-o",
        "fleet.yaml",
        "--force",
        "--node",
        "pve",
        "--storage",
        "tank",
        "--bridge",
        "vmbr0",
        "--iso-url",
        ISO_URL,
        "--iso-sha256",
        ISO_SHA,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_contains(&stderr, &["wrote fleet.yaml (valid)"]);
    assert_eq!(
        stdout,
        "nixgold import fleet.yaml image.nixos-golden 9000\nnixgold import fleet.yaml vm.web-01 101\n"
    );
    let fleet = std::fs::read_to_string(s.dir.path().join("fleet.yaml")).unwrap();
    assert_contains(
        &fleet,
        &[
            "    vmid_range:\n      first: 9000\n      last: 9009\n",
            "    clone: \"linked\"\n",
            "      ip: \"192.168.1.130/24\"\n      gateway: \"192.168.1.1\"\n",
            "    description: \"web server\"\n",
        ],
    );

    for import in stdout.lines() {
        let args: Vec<&str> = import.split_whitespace().skip(1).collect();
        let (code, _, stderr) = s.run(&args);
        assert_eq!(code, 0, "{stderr}");
        assert_contains(&stderr, &["nothing was written to Proxmox"]);
    }
    let lock = read_lock(&s);
    let generation = lock.images["nixos-golden"].current_generation().unwrap();
    assert!(
        generation.imported && generation.number == 1,
        "{generation:?}"
    );
    assert_eq!(lock.adopt["vm.web-01"].get(), 101);

    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "~ image.nixos-golden[pve]",
            "~ vm.web-01",
            "adopting it (nixgold import)",
            "Plan: 0 to create, 2 to update, 0 to replace, 0 to destroy.",
        ],
    );
    // Only the stamp and the fleet's tags: no clone, build or other key.
    let changed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("    ")?.split_once(' '))
        .filter(|(symbol, _)| ["~", "+", "-"].contains(symbol))
        .filter_map(|(_, rest)| rest.split_whitespace().next())
        .collect();
    assert_eq!(
        changed,
        ["description", "tags", "description", "tags"],
        "{text}"
    );

    let mark = s.sim.journal().len();
    s.converge();
    let writes: Vec<String> = s.sim.journal()[mark..]
        .iter()
        .filter(|e| e.method != "GET")
        .map(|e| format!("{} {}", e.method, e.route))
        .filter(|r| !r.contains("/pools"))
        .collect();
    assert_eq!(
        writes,
        [
            "POST /nodes/{node}/qemu/{vmid}/config",
            "POST /nodes/{node}/qemu/{vmid}/config"
        ],
        "apply wrote only the two configs (async POST, digest-guarded)"
    );
    assert_eq!(identity(&s, 101), before, "disks, MAC and uptime unchanged");
    assert!(s.config(101)["description"].starts_with(
        "web server\n\nnixgold: fleet=homelab resource=vm.web-01 image=nixos-golden generation=1"
    ));
    assert!(
        s.config(9000)["description"]
            .ends_with("resource=image.nixos-golden generation=1 imported=true")
    );
    assert!(read_lock(&s).adopt.is_empty(), "the adoption is settled");
}

#[test]
fn an_imported_templates_clones_keep_working_after_a_new_generation() {
    let fleet = adopted_fleet("    on_new_generation: keep\n");
    let s = Scenario::new(ClusterSpec::default(), &fleet, EMPTY_LOCK);
    s.hand_made_cluster("scsi0");
    assert_eq!(s.import("image.golden", "9000").0, 0);
    assert_eq!(s.import("vm.web-01", "101").0, 0);
    s.converge();
    let before = identity(&s, 101);

    // An input change builds a normal generation 2.
    s.set_fleet(&fleet.replace(
        "nixos: { state_version: \"24.05\" }",
        "nixos: { state_version: \"24.05\", packages: [htop] }",
    ));
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "+ image.golden[pve]",
            "its inputs changed since its template was imported",
        ],
    );
    s.converge();
    let lock = read_lock(&s);
    let image = &lock.images["golden"];
    let g2 = image.current_generation().unwrap();
    assert_eq!((g2.number, g2.imported), (2, false));
    assert!(g2.system_path.starts_with("/nix/store/"));
    // The linked clone still runs on the imported template, which stays.
    assert!(
        image
            .generations
            .iter()
            .any(|g| g.number == 1 && g.imported)
    );
    assert_eq!(s.config(9000)["template"], "1");
    assert_eq!(identity(&s, 101), before);
    assert!(s.config(101)["description"].contains("generation=1"));
}

fn refusal(s: &Scenario, address: &str, vmid: &str, expected: &str) {
    let lock_before = std::fs::read_to_string(s.dir.path().join("fleet.lock")).unwrap();
    let (code, _, stderr) = s.import(address, vmid);
    assert_eq!(code, 1, "{stderr}");
    assert_contains(&stderr, &[expected]);
    let lock_after = std::fs::read_to_string(s.dir.path().join("fleet.lock")).unwrap();
    assert_eq!(
        lock_before, lock_after,
        "a refused import leaves the lockfile alone"
    );
}

#[test]
fn import_refuses_what_it_cannot_adopt_and_says_why() {
    let s = Scenario::new(ClusterSpec::default(), &adopted_fleet(""), EMPTY_LOCK);
    s.hand_made_cluster("scsi0");
    refusal(&s, "vm.web-01", "9000", "VMID 9000 is a template, not a VM");
    refusal(
        &s,
        "image.golden",
        "101",
        "VMID 101 is a VM, not a template",
    );
    refusal(&s, "vm.web-02", "101", "the fleet has no such resource");
    refusal(&s, "vm.web-01", "555", "there is no VM 555 in the cluster");
    // Stamped by another fleet.
    s.api_call(
        "PUT",
        "/nodes/pve/qemu/101/config",
        &[(
            "description",
            "nixgold: fleet=lab resource=vm.web image=golden generation=1",
        )],
    );
    refusal(
        &s,
        "vm.web-01",
        "101",
        "VMID 101 is stamped as vm.web of fleet `lab`",
    );
    // Declared on another node.
    s.set_fleet(&adopted_fleet("    node: pve2\n").replace("nodes: [pve]", "nodes: [pve, pve2]"));
    s.api_call(
        "PUT",
        "/nodes/pve/qemu/101/config",
        &[("description", "web server")],
    );
    refusal(
        &s,
        "vm.web-01",
        "101",
        "VMID 101 is on node pve, the fleet declares it on pve2",
    );
}

#[test]
fn import_refuses_a_template_nixgold_cannot_clone_from() {
    let s = Scenario::new(ClusterSpec::default(), &adopted_fleet(""), EMPTY_LOCK);
    s.hand_made_cluster("virtio0");
    refusal(
        &s,
        "image.golden",
        "9000",
        "nixgold cannot clone from template 9000: its root disk is virtio0, not scsi0",
    );
}

// ----- init: converting Packer + Terraform (issue 16) --------------------

/// The plaintext secrets in `tests/fixtures/classic/`.
const CLASSIC_SECRETS: [&str; 5] = [
    "packer-token-s3cr3t-0001",
    "packer-build-pw-0002",
    "tf-token-s3cr3t-0003",
    "vm-pw-s3cr3t-0004",
    "state-pw-s3cr3t-0005",
];

/// Copies the classic fixtures next to the scenario's fleet.
fn classic_scenario() -> Scenario {
    let s = Scenario::new(ClusterSpec::default(), &adopted_fleet(""), EMPTY_LOCK);
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/classic");
    let copy = |rel: &str| {
        let to = s.dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from.join(rel), to).unwrap();
    };
    for rel in [
        "packer/nixos.auto.pkrvars.hcl",
        "packer/http/configuration.nix",
        "packer/install.sh",
        "terraform/terraform.tfvars",
        "terraform/terraform.tfstate",
    ] {
        copy(rel);
    }
    std::fs::remove_file(s.dir.path().join("fleet.yaml")).unwrap();
    s
}

/// Runs `init` on the Packer fixture and `terraform` (a tfvars or state);
/// checks no secret of the inputs is in its output or the fleet it wrote.
/// Returns (stdout, stderr, fleet text).
fn convert(s: &Scenario, terraform: &str) -> (String, String, String) {
    let (code, stdout, stderr) = s.run(&[
        "init",
        "-o",
        "fleet.yaml",
        "--from-packer",
        "packer/nixos.auto.pkrvars.hcl",
        "--from-terraform",
        terraform,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let fleet = std::fs::read_to_string(s.dir.path().join("fleet.yaml")).unwrap();
    for secret in CLASSIC_SECRETS {
        for text in [&stdout, &stderr, &fleet] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
    }
    (stdout, stderr, fleet)
}

#[test]
fn packer_and_terraform_variables_convert_to_a_fleet_that_plans_the_same_resources() {
    let s = classic_scenario();
    let (stdout, stderr, fleet) = convert(&s, "terraform/terraform.tfvars");
    assert_contains(
        &stderr,
        &[
            "`proxmox_token` holds a plaintext secret; it was not copied",
            "`proxmox_skip_tls_verify = true` turned TLS verification off; nixgold does not: pin the certificate with proxmox.tls.fingerprint",
            "vm.web-01's `ci_password` is a plaintext password; it was not copied: the fleet reads env WEB_01_PASSWORD",
            "packer/http/configuration.nix: its settings became images.nixos-golden-template.nixos.extra_config",
            "packer/install.sh: replaced by nixgold's own install script",
            "wrote fleet.yaml (valid)",
        ],
    );
    assert!(
        !fleet.contains("insecure:") && !fleet.contains("tls:"),
        "{fleet}"
    );
    assert_contains(
        &fleet,
        &[
            "  endpoint: \"https://192.168.1.10:8006\"\n",
            "    storage: \"local\"\n",
            "      first: 9000\n",
            "    password:\n      env: \"WEB_01_PASSWORD\"\n",
            "extra_config: \"# Tools every clone gets.\\nenvironment.systemPackages = with pkgs; [ vim git htop ];\\nservices.nginx.enable = true;\"",
        ],
    );
    assert_eq!(
        stdout,
        "nixgold import fleet.yaml image.nixos-golden-template 9000\nnixgold import fleet.yaml vm.web-01 101\nnixgold import fleet.yaml vm.web-02 102\n"
    );
    // On an empty cluster the fleet plans exactly what Packer and
    // Terraform made: the template and the two VMs.
    let (code, text) = s.plan();
    assert_eq!(code, 2);
    assert_contains(
        &text,
        &[
            "+ image.nixos-golden-template[pve]",
            "+ vm.web-01",
            "+ vm.web-02",
            "Plan: 4 to create, 0 to update, 0 to replace, 0 to destroy.",
        ],
    );
}

#[test]
fn a_bpg_state_converts_its_vms_and_leaves_their_passwords_behind() {
    let s = classic_scenario();
    let (stdout, stderr, fleet) = convert(&s, "terraform/terraform.tfstate");
    assert_contains(
        &stderr,
        &[
            "vm.web-01 has a password in the state (plaintext); it was not copied: the fleet reads env WEB_01_PASSWORD",
            "stop Terraform managing these VMs with `terraform state rm`",
        ],
    );
    assert_contains(
        &fleet,
        &[
            "  web-01:\n",
            "    clone: \"linked\"\n",
            "      dns: [\"192.168.1.1\"]\n",
            "    description: \"web server\"\n",
            "  web-02:\n",
            "    clone: \"full\"\n",
            "      dhcp: true\n",
        ],
    );
    assert!(!fleet.contains("WEB_02_PASSWORD"), "web-02 has no password");
    assert!(stdout.contains("vm.web-02 102"), "{stdout}");
    let (code, _, stderr) = s.run(&["validate", "fleet.yaml"]);
    assert_eq!(code, 0, "{stderr}");
}
