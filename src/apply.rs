//! Apply: executes a plan's changes, one pass that converges when re-run.
//!
//! A DAG scheduler: a change starts once the changes it depends on are
//! done (an ISO before the build that boots it, a build — recorded in the
//! lockfile — before the clones of its template and the retirement of the
//! generation it succeeds), with bounded concurrency that respects
//! Proxmox's serialisation points: clones from one template
//! and full clones into one storage each run under an [`AdaptiveLimit`]
//! that grows while clones succeed and halves on "can't lock file … got
//! timeout" (the configured numbers are ceilings). Lock contention
//! and 595/596/599 are retried with backoff after re-reading state; other
//! errors fail the change and skip exactly the changes that depend on it;
//! independent changes go on. Every step is reported as an [`Event`].
//!
//! Every VM is stamped at clone time (the clone call carries the
//! description), so an interrupted apply leaves VMs the next plan
//! recognises and finishes — never duplicates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pve_api::property::Net;
use pve_api::{ApiError, Client, CloneRequest, ConfigUpdate, Upid};
use tokio::sync::{Semaphore, mpsc};

use crate::address::Address;
use crate::build::BuildResult;
use crate::connect::read_secret;
use crate::limit::AdaptiveLimit;
use crate::plan::{Action, Change, Plan, VmWork, Work};
use crate::stamp::Stamp;

/// How often a running download's task log is read for its progress.
const DOWNLOAD_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Changes in flight at once.
    pub concurrency: usize,
    /// The most clones from one template at once: the ceiling of an
    /// adaptive limit that starts there, since clones hold the template's
    /// lock shared and contend only with an outside holder.
    pub per_template: usize,
    /// The most full clones into one storage at once (likewise): their
    /// copies share the storage's bandwidth, so more buys little.
    pub per_storage: usize,
    pub attempts: u32,
    pub retry_base: Duration,
    /// Deadline of one Proxmox task.
    pub task_timeout: Duration,
    /// Where relative secret files are found (the fleet's directory).
    pub base_dir: PathBuf,
    /// Keep the VM of a failed build (renamed in the report) for debugging.
    pub keep_failed_build: bool,
    /// Host of the Proxmox endpoint: the call-home address is the local
    /// address that routes there.
    pub endpoint_host: String,
    /// Where each build writes its full log (steps and install output).
    pub log_dir: Option<PathBuf>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            concurrency: 128,
            per_template: 128,
            per_storage: 4,
            attempts: 6,
            retry_base: Duration::from_millis(500),
            task_timeout: Duration::from_secs(30 * 60),
            base_dir: PathBuf::from("."),
            keep_failed_build: false,
            endpoint_host: "127.0.0.1".to_owned(),
            log_dir: None,
        }
    }
}

/// Progress of an apply, for the terminal view and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        address: String,
        step: String,
    },
    Finished {
        address: String,
        step: String,
        elapsed: Duration,
    },
    Retrying {
        address: String,
        step: String,
        error: String,
    },
    Failed {
        address: String,
        step: String,
        error: String,
    },
    /// A line of a long step's progress (a build's steps and output).
    Progress {
        address: String,
        line: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed {
        step: String,
        error: String,
    },
    /// Not attempted because a change it depends on failed.
    Skipped {
        because: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeReport {
    pub address: Address,
    pub action: Action,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<ChangeReport>,
}

impl Report {
    pub fn succeeded(&self) -> bool {
        self.changes.iter().all(|c| c.outcome == Outcome::Done)
    }
}

struct Ctx {
    client: Client,
    /// Changes in flight at once (`--concurrency`).
    global: Arc<Semaphore>,
    opts: ApplyOptions,
    /// The fleet whose ownership stamp every VM apply touches must carry.
    fleet: String,
    events: mpsc::UnboundedSender<Event>,
    templates: std::sync::Mutex<BTreeMap<u32, Arc<AdaptiveLimit>>>,
    storages: std::sync::Mutex<BTreeMap<String, Arc<AdaptiveLimit>>>,
    /// Static build addresses in use.
    addresses: std::sync::Mutex<BTreeMap<String, Arc<Semaphore>>>,
}

impl Ctx {
    /// Sends an event, secrets redacted (an API error or a build's output
    /// may echo one).
    fn emit(&self, e: Event) {
        let r = |text: String| crate::redact::redact(&text).into_owned();
        let e = match e {
            Event::Retrying {
                address,
                step,
                error,
            } => Event::Retrying {
                address,
                step,
                error: r(error),
            },
            Event::Failed {
                address,
                step,
                error,
            } => Event::Failed {
                address,
                step,
                error: r(error),
            },
            Event::Progress { address, line } => Event::Progress {
                address,
                line: r(line),
            },
            other => other,
        };
        let _ = self.events.send(e);
    }

    /// The limiter of `key`, made by `make` the first time.
    fn limiter<K: Ord, L>(
        map: &std::sync::Mutex<BTreeMap<K, Arc<L>>>,
        key: K,
        make: impl FnOnce() -> L,
    ) -> Arc<L> {
        let mut m = map.lock().expect("limiters");
        m.entry(key).or_insert_with(|| Arc::new(make())).clone()
    }

    /// Runs one step: reports it, retries what is worth retrying.
    async fn step<T, F, Fut>(&self, address: &str, step: &str, mut f: F) -> Result<T, Outcome>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        self.emit(Event::Started {
            address: address.to_owned(),
            step: step.to_owned(),
        });
        let started = Instant::now();
        let mut delay = self.opts.retry_base;
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => {
                    self.emit(Event::Finished {
                        address: address.to_owned(),
                        step: step.to_owned(),
                        elapsed: started.elapsed(),
                    });
                    return Ok(v);
                }
                Err(e)
                    if (e.is_lock_contention() || e.is_transport())
                        && attempt < self.opts.attempts =>
                {
                    self.emit(Event::Retrying {
                        address: address.to_owned(),
                        step: step.to_owned(),
                        error: e.to_string(),
                    });
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(20));
                    attempt += 1;
                }
                Err(e) => {
                    self.emit(Event::Failed {
                        address: address.to_owned(),
                        step: step.to_owned(),
                        error: e.to_string(),
                    });
                    return Err(Outcome::Failed {
                        step: step.to_owned(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }

    /// Waits for a download task, reporting its progress from the task log
    /// (read every `DOWNLOAD_POLL`, from where the last read ended).
    async fn wait_download(&self, address: &str, upid: &Upid) -> Result<(), ApiError> {
        let done = self.wait(upid);
        tokio::pin!(done);
        let mut progress = crate::download::DownloadProgress::default();
        let mut seen = 0;
        loop {
            tokio::select! {
                result = &mut done => return result,
                () = tokio::time::sleep(DOWNLOAD_POLL) => {
                    let Ok((lines, _)) = self.client.task_log(upid, seen, 0).await else {
                        continue;
                    };
                    seen += lines.len() as u64;
                    if let Some(line) = lines.iter().filter_map(|l| progress.feed(&l.t)).last() {
                        self.emit(Event::Progress { address: address.to_owned(), line });
                    }
                }
            }
        }
    }

    /// Waits for a task up to the task deadline; a task still running then
    /// is reported with what it is and what its log says it waits for.
    async fn wait(&self, upid: &Upid) -> Result<(), ApiError> {
        match self
            .client
            .wait_task_for(upid, self.opts.task_timeout)
            .await
        {
            Err(ApiError::TaskTimeout { seconds, .. }) => {
                let log = self.client.log_tail(upid, 1).await;
                Err(ApiError::Timeout {
                    what: format!(
                        "the {} task of {} on {} ({upid}; the deadline is task_timeout or --task-timeout; its log {})",
                        upid.kind,
                        if upid.id.is_empty() {
                            "the node".to_owned()
                        } else {
                            format!("VM {}", upid.id)
                        },
                        upid.node,
                        log.last()
                            .map_or("is still empty".to_owned(), |l| format!("ends: {l:?}"))
                    ),
                    seconds,
                })
            }
            other => other.map(|_| ()),
        }
    }
}

/// What apply tells the lockfile as changes finish. It is called on
/// apply's own task, before any change that depends on the finished one
/// starts — so an old generation is retired only after its successor is
/// recorded. An error fails the change that finished.
pub trait Ledger {
    /// A build finished: record its result.
    fn built(&mut self, result: &BuildResult) -> Result<(), String>;
    /// A change finished (a retired template is gone, an adopted VM is
    /// stamped, …).
    fn done(&mut self, change: &Change) -> Result<(), String>;
}

/// A ledger that keeps nothing: for runs whose results go nowhere (the
/// benchmarks); `nixgold apply` records into the lockfile (`record::LockLedger`).
pub struct Unrecorded;

impl Ledger for Unrecorded {
    fn built(&mut self, _: &BuildResult) -> Result<(), String> {
        Ok(())
    }

    fn done(&mut self, _: &Change) -> Result<(), String> {
        Ok(())
    }
}

/// Applies `plan`: a DAG scheduler over its changes. A change starts as
/// soon as every change it depends on is done — there are no phase
/// barriers — inside the limits (overall `concurrency`, clones per
/// template and per storage, builds per static address); a change whose
/// dependency failed or was skipped is skipped. Among changes ready at
/// once, the plan's order decides. Returns when every change has finished,
/// failed or been skipped; the report is in the plan's order.
pub async fn apply(
    client: &Client,
    plan: &Plan,
    opts: ApplyOptions,
    events: mpsc::UnboundedSender<Event>,
    ledger: &mut dyn Ledger,
) -> Report {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        global: Arc::new(Semaphore::new(opts.concurrency.max(1))),
        opts,
        fleet: plan.fleet.clone(),
        events,
        templates: Default::default(),
        storages: Default::default(),
        addresses: Default::default(),
    });
    let mut run = Schedule::new(plan);
    let rolling = |c: &Change| {
        plan.rollout
            .as_ref()
            .is_some_and(|r| r.contains(&c.address.to_string()))
    };
    run_dag(&ctx, plan, &mut run, &|c| !rolling(c), ledger).await;
    if let Some(rollout) = &plan.rollout {
        run_rollout(&ctx, plan, rollout, &mut run, ledger).await;
        // What waited for the rollout (the retirement of the generation
        // its VMs left).
        run_dag(&ctx, plan, &mut run, &|_| true, ledger).await;
    }
    run.report(plan)
}

/// Runs the changes `selected` picks as a DAG: each starts once the
/// changes it depends on are over and done; returns when none runs and
/// none of them can start.
async fn run_dag(
    ctx: &Arc<Ctx>,
    plan: &Plan,
    run: &mut Schedule,
    selected: &dyn Fn(&Change) -> bool,
    ledger: &mut dyn Ledger,
) {
    let mut set = tokio::task::JoinSet::new();
    loop {
        for i in run.ready(&|i| selected(&plan.changes[i])) {
            let ctx = ctx.clone();
            let change = plan.changes[i].clone();
            set.spawn(async move {
                let _permit = ctx.global.clone().acquire_owned().await;
                (i, run_change(&ctx, &change).await)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, result) = joined.expect("a change task does not panic");
        let outcome = settle(&plan.changes[i], result, ledger);
        run.finish(i, outcome);
    }
}

/// The rollout's batches in order: each batch's replacements (as a DAG),
/// then its health gates, then the pause. A replacement or a gate that
/// fails stops the rollout; the later batches are skipped and stay on
/// their generation.
async fn run_rollout(
    ctx: &Arc<Ctx>,
    plan: &Plan,
    rollout: &crate::plan::Rollout,
    run: &mut Schedule,
    ledger: &mut dyn Ledger,
) {
    let mut stopped: Option<String> = None;
    for (i, batch) in rollout.batches.iter().enumerate() {
        if let Some(because) = &stopped {
            batch.iter().for_each(|a| run.skip(a, because));
            continue;
        }
        let in_batch = |c: &Change| batch.contains(&c.address.to_string());
        run_dag(ctx, plan, run, &in_batch, ledger).await;
        if let Some(address) = batch.iter().find(|a| !run.is_done(a)) {
            stopped = Some(format!(
                "the rollout stopped at batch {}: {address} failed",
                i + 1
            ));
            continue;
        }
        if let Err(address) = gate_batch(ctx, plan, rollout, i, run).await {
            stopped = Some(format!(
                "the rollout stopped at batch {}: {address} failed its health gate",
                i + 1
            ));
            continue;
        }
        if let Some(pause) = rollout.pause.filter(|_| i + 1 < rollout.batches.len()) {
            tokio::time::sleep(pause.get()).await;
        }
    }
}

/// The health gates of batch `i`; a VM that fails one fails its change.
async fn gate_batch(
    ctx: &Ctx,
    plan: &Plan,
    rollout: &crate::plan::Rollout,
    i: usize,
    run: &mut Schedule,
) -> Result<(), String> {
    let batch = &rollout.batches[i];
    let step = format!("health gates of batch {} ({})", i + 1, rollout.gates_text());
    let vms = crate::rollout::batch_vms(batch, &plan.changes);
    let started = Instant::now();
    ctx.emit(Event::Started {
        address: batch.join(", "),
        step: step.clone(),
    });
    match crate::rollout::check_batch(&ctx.client, rollout, &vms).await {
        Ok(()) => {
            ctx.emit(Event::Finished {
                address: batch.join(", "),
                step,
                elapsed: started.elapsed(),
            });
            Ok(())
        }
        Err((address, error)) => {
            ctx.emit(Event::Failed {
                address: address.clone(),
                step: "health gate".into(),
                error: error.clone(),
            });
            run.overrule(
                &address,
                Outcome::Failed {
                    step: "health gate".into(),
                    error,
                },
            );
            Err(address)
        }
    }
}

/// A finished change's outcome, once the ledger has what it produced.
fn settle(
    change: &Change,
    result: Result<Option<BuildResult>, Outcome>,
    ledger: &mut dyn Ledger,
) -> Outcome {
    let recorded = match &result {
        Ok(Some(built)) => ledger.built(built).and_then(|()| ledger.done(change)),
        Ok(None) => ledger.done(change),
        Err(outcome) => return outcome.clone(),
    };
    match recorded {
        Ok(()) => Outcome::Done,
        Err(error) => Outcome::Failed {
            step: "record in the lockfile".into(),
            error,
        },
    }
}

/// Where each change of a plan stands while apply runs.
struct Schedule {
    addresses: Vec<String>,
    /// Indices of the changes each change depends on.
    depends_on: Vec<Vec<usize>>,
    state: Vec<State>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Over(Outcome),
}

impl Schedule {
    fn new(plan: &Plan) -> Self {
        let index: BTreeMap<&Address, usize> = plan
            .changes
            .iter()
            .enumerate()
            .map(|(i, c)| (&c.address, i))
            .collect();
        let depends_on = plan
            .changes
            .iter()
            .map(|c| {
                c.depends_on
                    .iter()
                    .filter_map(|d| index.get(d).copied())
                    .collect()
            })
            .collect();
        Schedule {
            addresses: plan.changes.iter().map(|c| c.address.to_string()).collect(),
            depends_on,
            state: vec![State::Waiting; plan.changes.len()],
        }
    }

    /// The waiting `selected` changes that can start now, in the plan's
    /// order (they are marked running); those behind a failure are
    /// skipped. The plan's order is topological, so one pass settles a
    /// chain.
    fn ready(&mut self, selected: &dyn Fn(usize) -> bool) -> Vec<usize> {
        let mut start = Vec::new();
        for i in 0..self.state.len() {
            if self.state[i] != State::Waiting || !selected(i) {
                continue;
            }
            let blocked = self.depends_on[i]
                .iter()
                .find_map(|&d| match &self.state[d] {
                    State::Over(Outcome::Done) => None,
                    State::Over(Outcome::Failed { .. }) => Some(Some((d, "failed"))),
                    State::Over(Outcome::Skipped { .. }) => Some(Some((d, "was skipped"))),
                    State::Waiting | State::Running => Some(None),
                });
            match blocked {
                None => {
                    self.state[i] = State::Running;
                    start.push(i);
                }
                Some(Some((d, why))) => {
                    self.state[i] = State::Over(Outcome::Skipped {
                        because: format!("{} {why}", self.addresses[d]),
                    })
                }
                Some(None) => {}
            }
        }
        start
    }

    fn finish(&mut self, i: usize, outcome: Outcome) {
        self.state[i] = State::Over(outcome);
    }

    fn index(&self, address: &str) -> Option<usize> {
        self.addresses.iter().position(|a| a == address)
    }

    /// Skips the waiting change at `address`.
    fn skip(&mut self, address: &str, because: &str) {
        if let Some(i) = self
            .index(address)
            .filter(|i| self.state[*i] == State::Waiting)
        {
            self.state[i] = State::Over(Outcome::Skipped {
                because: because.to_owned(),
            });
        }
    }

    fn is_done(&self, address: &str) -> bool {
        self.index(address)
            .is_some_and(|i| self.state[i] == State::Over(Outcome::Done))
    }

    /// A finished change's outcome found wrong afterwards (a health gate).
    fn overrule(&mut self, address: &str, outcome: Outcome) {
        if let Some(i) = self.index(address) {
            self.state[i] = State::Over(outcome);
        }
    }

    fn report(self, plan: &Plan) -> Report {
        let changes = plan
            .changes
            .iter()
            .zip(self.state)
            .map(|(c, state)| ChangeReport {
                address: c.address.clone(),
                action: c.action,
                // Apply ends when no change runs and none can start; a
                // change still waiting then waits for one that never ran.
                outcome: match state {
                    State::Over(outcome) => outcome,
                    State::Waiting | State::Running => Outcome::Skipped {
                        because: "a change it depends on never ran".into(),
                    },
                },
            })
            .collect();
        Report { changes }
    }
}

async fn run_change(ctx: &Ctx, change: &Change) -> Result<Option<BuildResult>, Outcome> {
    let address = change.address.to_string();
    let address = address.as_str();
    if let Work::BuildTemplate {
        build,
        cleanup_first,
    } = &change.work
    {
        return build_template(ctx, address, build, *cleanup_first)
            .await
            .map(Some);
    }
    run_vm_change(ctx, change).await.map(|()| None)
}

async fn build_template(
    ctx: &Ctx,
    address: &str,
    w: &crate::build::BuildWork,
    cleanup_first: bool,
) -> Result<BuildResult, Outcome> {
    let build_vm = Owner::template(&w.image, w.generation);
    if cleanup_first {
        destroy_vm(ctx, address, w.vmid.get(), &w.node, &build_vm).await?;
    }
    // Builds that share a static address take turns.
    let _address = match &w.access {
        crate::build::Access::Static { address, .. } => Some(
            Ctx::limiter(&ctx.addresses, address.clone(), || Semaphore::new(1))
                .acquire_owned()
                .await
                .expect("open semaphore"),
        ),
        crate::build::Access::CallHome { .. } => None,
    };
    let progress = BuildProgress {
        ctx,
        address,
        w,
        current: std::sync::Mutex::new(crate::build::Step::Create),
        log: ctx
            .opts
            .log_dir
            .as_deref()
            .and_then(|dir| BuildLog::create(dir, w)),
    };
    let observe = |e: crate::build::BuildEvent<'_>| progress.observe(e);
    match crate::build::run(&ctx.client, &ctx.opts.endpoint_host, w, &observe).await {
        Ok(result) => Ok(result),
        Err(e) => Err(build_failed(&progress, &build_vm, e.to_string()).await),
    }
}

/// A failed build: reported at the step it failed in (with its log's
/// path), and its build VM destroyed unless `--keep-failed-build`.
async fn build_failed(
    progress: &BuildProgress<'_>,
    build_vm: &Owner,
    mut error: String,
) -> Outcome {
    let BuildProgress {
        ctx, address, w, ..
    } = *progress;
    let step = progress.label(*progress.current.lock().expect("step"));
    if let Some(log) = &progress.log {
        log.write(&format!("FAILED at {step}: {error}"));
        error.push_str(&format!("\n  build log: {}", log.path.display()));
    }
    ctx.emit(Event::Failed {
        address: address.to_owned(),
        step: step.clone(),
        error: error.clone(),
    });
    if ctx.opts.keep_failed_build {
        progress.observe(crate::build::BuildEvent::Line(&format!(
            "kept the failed build VM {} on {} for debugging",
            w.vmid, w.node
        )));
    } else {
        // Only the build's own VM: a VM someone created at this VMID after
        // the plan (the create then failed) stays.
        let _ = destroy_vm(ctx, address, w.vmid.get(), &w.node, build_vm).await;
    }
    Outcome::Failed { step, error }
}

/// One build's progress: each step and output line goes to apply's events
/// and to the build log; the step under way is kept for a failure report.
struct BuildProgress<'a> {
    ctx: &'a Ctx,
    address: &'a str,
    w: &'a crate::build::BuildWork,
    current: std::sync::Mutex<crate::build::Step>,
    log: Option<BuildLog>,
}

impl BuildProgress<'_> {
    /// `generation 2 (VMID 9001): 3/9 get SSH access to the installer`.
    fn label(&self, step: crate::build::Step) -> String {
        format!(
            "generation {} (VMID {}): {}/{} {}",
            self.w.generation,
            self.w.vmid,
            step.number(),
            crate::build::Step::ALL.len(),
            step.describe()
        )
    }

    fn observe(&self, e: crate::build::BuildEvent<'_>) {
        let address = self.address.to_owned();
        let line = match e {
            crate::build::BuildEvent::Started(step) => {
                *self.current.lock().expect("step") = step;
                self.ctx.emit(Event::Started {
                    address,
                    step: self.label(step),
                });
                format!("{}…", self.label(step))
            }
            crate::build::BuildEvent::Finished(step, elapsed) => {
                self.ctx.emit(Event::Finished {
                    address,
                    step: self.label(step),
                    elapsed,
                });
                format!("{} done ({:.1}s)", self.label(step), elapsed.as_secs_f64())
            }
            crate::build::BuildEvent::Line(line) => {
                self.ctx.emit(Event::Progress {
                    address,
                    line: line.to_owned(),
                });
                line.to_owned()
            }
        };
        if let Some(log) = &self.log {
            log.write(&line);
        }
    }
}

/// The full log of one build: every step and every line of the install's
/// output, timestamped — the progress view shows only the latest line.
struct BuildLog {
    path: PathBuf,
    file: std::sync::Mutex<std::fs::File>,
}

impl BuildLog {
    /// `DIR/<image>-g<N>-<node>.log`, truncated. Logging is best effort: a
    /// build does not fail because its log cannot be written.
    fn create(dir: &std::path::Path, w: &crate::build::BuildWork) -> Option<Self> {
        let path = dir.join(format!("{}-g{}-{}.log", w.image, w.generation, w.node));
        let file = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::File::create(&path))
            .map_err(|e| tracing::warn!("cannot write the build log {}: {e}", path.display()))
            .ok()?;
        Some(BuildLog {
            path,
            file: std::sync::Mutex::new(file),
        })
    }

    fn write(&self, line: &str) {
        use std::io::Write as _;
        let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let line = crate::redact::redact(line);
        let _ = writeln!(self.file.lock().expect("log"), "[{at}] {line}");
    }
}

async fn run_vm_change(ctx: &Ctx, change: &Change) -> Result<(), Outcome> {
    let address = change.address.to_string();
    let address = address.as_str();
    match &change.work {
        Work::DownloadIso {
            node,
            storage,
            url,
            filename,
            sha256,
        } => {
            ctx.step(
                address,
                "download (checksum verified on the node)",
                || async {
                    let upid = ctx
                        .client
                        .download_url(node, storage, url, filename, &sha256.to_string())
                        .await?;
                    ctx.wait_download(address, &upid).await
                },
            )
            .await
        }
        Work::CreateVm(w) => create_vm(ctx, address, w).await,
        Work::UpdateVm(w) => update_vm(ctx, address, w).await,
        Work::ReplaceVm { old_node, new } => {
            let this_vm = Owner::vm(address);
            destroy_vm(ctx, address, new.vmid.get(), old_node, &this_vm).await?;
            create_vm(ctx, address, new).await
        }
        Work::DestroyVm { vmid, node } => {
            let this_vm = Owner::vm(address);
            destroy_vm(ctx, address, vmid.get(), node, &this_vm).await
        }
        Work::DestroyTemplate {
            image,
            generation,
            vmid,
            node,
            ..
        } => {
            let template = Owner::template(image, *generation);
            destroy_vm(ctx, address, vmid.get(), node, &template).await
        }
        Work::AdoptTemplate {
            image,
            vmid,
            node,
            set,
            digest,
        } => {
            let owner = Owner {
                resource: format!("image.{image}"),
                generation: None,
            };
            ctx.step(address, "write the stamp and tags", || async {
                let current = ctx.client.vm_config(node, vmid.get(), false).await?;
                if current.get("description").and_then(Stamp::parse).is_some() {
                    // Written by an earlier attempt whose answer was lost.
                    return check_owner(ctx, &current, vmid.get(), node, &owner);
                }
                let update = ConfigUpdate {
                    set: set.clone(),
                    delete: Vec::new(),
                    digest: Some(digest.clone()),
                };
                ctx.wait(&ctx.client.update_config(node, vmid.get(), &update).await?)
                    .await
            })
            .await
        }
        Work::BuildTemplate { .. } => unreachable!("builds run in build_template"),
    }
}

/// What a VM's stamp must say (besides the fleet) for apply to touch it:
/// the resource, and for a template or build VM its generation.
struct Owner {
    resource: String,
    generation: Option<u32>,
}

impl Owner {
    fn vm(address: &str) -> Self {
        Owner {
            resource: address.to_owned(),
            generation: None,
        }
    }

    fn template(image: &str, generation: u32) -> Self {
        Owner {
            resource: format!("image.{image}"),
            generation: Some(generation),
        }
    }

    fn owns(&self, fleet: &str, stamp: &Stamp) -> bool {
        stamp.is(fleet, &self.resource)
            && self.generation.is_none_or(|g| stamp.generation == Some(g))
    }
}

/// Checks, at the moment of writing, that `cfg` (VMID `vmid` on `node`,
/// just read) is still the VM the plan meant: stamped by this fleet with
/// `owner`'s values. Anything else — a VM created at that VMID after the
/// plan, a stamp edited away — is left alone, and the change fails.
fn check_owner(
    ctx: &Ctx,
    cfg: &pve_api::types::VmConfig,
    vmid: u32,
    node: &str,
    owner: &Owner,
) -> Result<(), ApiError> {
    let stamp = cfg.get("description").and_then(Stamp::parse);
    if stamp.as_ref().is_some_and(|s| owner.owns(&ctx.fleet, s)) {
        return Ok(());
    }
    Err(ApiError::Conflict {
        message: format!(
            "VMID {vmid} on {node} is not the VM the plan meant (`{}`, {}); nixgold left it alone",
            cfg.get("name").unwrap_or("unnamed"),
            match stamp {
                Some(s) => format!("stamped as {} of fleet {}", s.resource, s.fleet),
                None => "not stamped by nixgold".to_owned(),
            }
        ),
    })
}

/// Re-reads the VM and checks its owner; `Ok(false)`: it is gone.
async fn still_ours(ctx: &Ctx, vmid: u32, node: &str, owner: &Owner) -> Result<bool, ApiError> {
    match ctx.client.vm_config(node, vmid, false).await {
        Ok(cfg) => check_owner(ctx, &cfg, vmid, node, owner).map(|()| true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

async fn destroy_vm(
    ctx: &Ctx,
    address: &str,
    vmid: u32,
    node: &str,
    owner: &Owner,
) -> Result<(), Outcome> {
    ctx.step(address, "stop", || async {
        if !still_ours(ctx, vmid, node, owner).await? {
            return Ok(());
        }
        match ctx.client.vm_status(node, vmid).await {
            Ok(s) if s.is_running() => ctx.wait(&ctx.client.stop(node, vmid).await?).await,
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await?;
    ctx.step(address, "destroy", || async {
        if !still_ours(ctx, vmid, node, owner).await? {
            return Ok(());
        }
        match ctx.client.destroy(node, vmid, true, false).await {
            Ok(upid) => ctx.wait(&upid).await,
            // Already gone (an earlier attempt whose answer was lost).
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
}

async fn create_vm(ctx: &Ctx, address: &str, w: &VmWork) -> Result<(), Outcome> {
    let template = Ctx::limiter(&ctx.templates, w.template_vmid.get(), || {
        AdaptiveLimit::optimistic(ctx.opts.per_template)
    });
    let storage = w.storage.as_ref().map(|s| {
        Ctx::limiter(&ctx.storages, s.clone(), || {
            AdaptiveLimit::new(ctx.opts.per_storage)
        })
    });
    let step = format!(
        "{} clone of template {}",
        if w.full_clone { "full" } else { "linked" },
        w.template_vmid
    );
    // Each attempt takes its slots anew, so a retry waits behind the
    // limit that its own contention lowered.
    let mut attempted = false;
    ctx.step(address, &step, || {
        let retry = std::mem::replace(&mut attempted, true);
        let (template, storage) = (&template, &storage);
        async move {
            let slots = [
                Some(template.acquire().await),
                match &storage {
                    Some(l) => Some(l.acquire().await),
                    None => None,
                },
            ];
            let result = clone_once(ctx, w, retry).await;
            for slot in slots.iter().flatten() {
                match &result {
                    Ok(()) => slot.succeeded(),
                    Err(e) if e.is_lock_contention() => {
                        let now = slot.contended();
                        ctx.emit(Event::Progress {
                            address: address.to_owned(),
                            line: format!("lock contention: at most {now} such clones at once now"),
                        });
                    }
                    Err(_) => {}
                }
            }
            result
        }
    })
    .await?;
    configure(ctx, address, w, Known::Fresh).await
}

/// One clone attempt. Before re-sending after a failure (`retry`), the
/// target is looked up: a stamped VM there means the earlier clone went
/// through. The first attempt skips that read: the plan found no VM there.
async fn clone_once(ctx: &Ctx, w: &VmWork, retry: bool) -> Result<(), ApiError> {
    let description = w.set.get("description").cloned();
    if retry
        && let Ok(cfg) = ctx.client.vm_config(&w.node, w.vmid.get(), false).await
        && cfg.get("description") == description.as_deref()
    {
        return wait_unlocked(ctx, w).await;
    }
    let request = CloneRequest {
        newid: w.vmid.get(),
        name: Some(w.name.clone()),
        full: w.full_clone,
        storage: w.storage.clone(),
        target: (w.node != w.template_node).then(|| w.node.to_string()),
        description,
        pool: None,
    };
    let upid = ctx
        .client
        .clone_vm(&w.template_node, w.template_vmid.get(), &request)
        .await?;
    ctx.wait(&upid).await
}

/// Waits until a clone that is still running has released its target.
async fn wait_unlocked(ctx: &Ctx, w: &VmWork) -> Result<(), ApiError> {
    let deadline = Instant::now() + ctx.opts.task_timeout;
    loop {
        let cfg = ctx.client.vm_config(&w.node, w.vmid.get(), false).await?;
        match cfg.get("lock") {
            None => return Ok(()),
            Some(lock) if Instant::now() > deadline => {
                return Err(ApiError::Locked {
                    message: format!("VM is locked ({lock})"),
                });
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn update_vm(ctx: &Ctx, address: &str, w: &VmWork) -> Result<(), Outcome> {
    configure(ctx, address, w, Known::Planned(w.digest.clone())).await
}

/// What apply knows of the VM it configures, which decides what its first
/// attempt at each step must read first.
#[derive(Debug, Clone)]
enum Known {
    /// This apply's own clone task created it a moment ago: the task's
    /// success proves it ours (a VMID someone else took fails the clone),
    /// and it is stopped. The first config write is a synchronous `PUT`
    /// with no read before it and the first start no status read: a
    /// hundred clones then cost five requests each, not ten. A retry — an
    /// answer lost, a lock contended — reads and checks as for any VM.
    Fresh,
    /// A VM the plan read, and the config digest it read (if any): every
    /// write re-reads the VM and checks that it is still ours.
    Planned(Option<String>),
}

/// The first write to a VM this apply just cloned: only the keys the
/// clone does not already carry, one synchronous call. A `net0` without a
/// MAC gets a new one from Proxmox (`parse_net` fills it in), as good as
/// the clone's own on a VM that never booted.
async fn write_fresh(ctx: &Ctx, w: &VmWork, set: BTreeMap<String, String>) -> Result<(), ApiError> {
    let update = ConfigUpdate {
        set,
        delete: Vec::new(),
        digest: None,
    };
    ctx.client
        .update_config_sync(&w.node, w.vmid.get(), &update)
        .await
}

/// One digest-guarded config write of a VM that must still be ours.
async fn write_config(
    ctx: &Ctx,
    address: &str,
    w: &VmWork,
    mut set: BTreeMap<String, String>,
    planned: Option<String>,
) -> Result<(), ApiError> {
    let current = ctx.client.vm_config(&w.node, w.vmid.get(), false).await?;
    // An adopted VM has no stamp until this write; the plan's digest
    // guards that it is still the VM the plan read.
    let unstamped = current.get("description").and_then(Stamp::parse).is_none();
    let adopt_digest = w.digest.clone().filter(|_| w.adopt && unstamped);
    if adopt_digest.is_none() {
        check_owner(ctx, &current, w.vmid.get(), &w.node, &Owner::vm(address))?;
    }
    // Keep the MAC Proxmox generated at clone time.
    if let Some(net) = set.get_mut("net0") {
        let mut want = Net::parse(net);
        if want.mac.is_none() {
            want.mac = current.get("net0").map(Net::parse).and_then(|n| n.mac);
        }
        *net = want.to_string();
    }
    // The plan-time digest guards the first write; a retry after lock
    // contention re-reads it (the values are the same).
    let digest = adopt_digest.or(planned).unwrap_or(current.digest);
    let update = ConfigUpdate {
        set,
        delete: Vec::new(),
        digest: Some(digest),
    };
    let upid = ctx
        .client
        .update_config(&w.node, w.vmid.get(), &update)
        .await?;
    ctx.wait(&upid).await
}

/// Config write (one, digest-guarded unless `Fresh`), resize, start — in
/// that order, so the first boot sees the cloud-init data.
async fn configure(ctx: &Ctx, address: &str, w: &VmWork, known: Known) -> Result<(), Outcome> {
    let mut set = w.set.clone();
    if let Some(reference) = &w.password {
        let secret = read_secret(
            reference,
            &ctx.opts.base_dir,
            &format!("{address}.password"),
        )
        .map_err(|e| Outcome::Failed {
            step: "read password".into(),
            error: e.to_string(),
        })?;
        set.insert("cipassword".into(), secret.expose().to_owned());
    }
    if let Known::Fresh = known {
        // The clone call carried them.
        set.remove("name");
        set.remove("description");
    }
    if !set.is_empty() {
        let mut attempted = false;
        ctx.step(address, "configure (cloud-init, resources, tags)", || {
            let retry = std::mem::replace(&mut attempted, true);
            let set = set.clone();
            let known = known.clone();
            async move {
                match known {
                    Known::Fresh if !retry => write_fresh(ctx, w, set).await,
                    Known::Fresh => write_config(ctx, address, w, set, None).await,
                    Known::Planned(digest) => {
                        write_config(ctx, address, w, set, digest.filter(|_| !retry)).await
                    }
                }
            }
        })
        .await?;
    }
    if let Some(size) = &w.resize {
        ctx.step(address, &format!("grow disk to {size}"), || async {
            match ctx
                .client
                .resize(&w.node, w.vmid.get(), "scsi0", size, None)
                .await?
            {
                Some(upid) => ctx.wait(&upid).await,
                None => Ok(()),
            }
        })
        .await?;
    }
    if w.restart {
        shut_down(ctx, address, w).await?;
    }
    if w.start || w.restart {
        start(ctx, address, w, matches!(known, Known::Fresh)).await?;
    }
    Ok(())
}

/// Pending changes apply at a cold start; the start step after this
/// brings the VM back. A guest that ignores the shutdown is stopped after
/// the timeout.
async fn shut_down(ctx: &Ctx, address: &str, w: &VmWork) -> Result<(), Outcome> {
    ctx.step(address, "shut down (to apply pending changes)", || async {
        if !ctx
            .client
            .vm_status(&w.node, w.vmid.get())
            .await?
            .is_running()
        {
            return Ok(());
        }
        let down = ctx
            .client
            .shutdown(&w.node, w.vmid.get(), 120, true)
            .await?;
        ctx.wait(&down).await
    })
    .await
}

/// Starts the VM unless it runs. A VM this apply just cloned (`fresh`) is
/// known to be stopped: its first attempt skips the status read.
async fn start(ctx: &Ctx, address: &str, w: &VmWork, fresh: bool) -> Result<(), Outcome> {
    let mut attempted = false;
    ctx.step(address, "start", || {
        let retry = std::mem::replace(&mut attempted, true);
        async move {
            if !fresh || retry {
                let status = ctx.client.vm_status(&w.node, w.vmid.get()).await;
                if status.is_ok_and(|s| s.is_running()) {
                    return Ok(());
                }
            }
            ctx.wait(&ctx.client.start(&w.node, w.vmid.get()).await?)
                .await
        }
    })
    .await
}
