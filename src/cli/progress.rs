//! Apply's progress on the terminal: spinners, plain lines or JSON Lines.

use std::io::IsTerminal;

use tokio::sync::mpsc;

use crate::apply::Event;

/// Shows apply's events: a live view (one spinner per change) on a
/// terminal, plain timestamped lines otherwise (CI logs, pipes).
/// With `--json`, JSON Lines on stdout instead.
pub(super) async fn print_events(mut rx: mpsc::UnboundedReceiver<Event>, quiet: bool, json: bool) {
    let live = !quiet && !json && std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{spinner} [{elapsed:>4}] {prefix} {msg}")
        .expect("a valid template")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓");
    let mut spinners: std::collections::BTreeMap<String, indicatif::ProgressBar> =
        Default::default();
    while let Some(event) = rx.recv().await {
        if json {
            super::apply_json::event(event);
            continue;
        }
        if quiet {
            continue;
        }
        if live {
            let address = match &event {
                Event::Started { address, .. }
                | Event::Finished { address, .. }
                | Event::Retrying { address, .. }
                | Event::Failed { address, .. }
                | Event::Progress { address, .. } => address.clone(),
            };
            let bar = spinners.entry(address.clone()).or_insert_with(|| {
                let bar = bars.add(indicatif::ProgressBar::new_spinner().with_style(style.clone()));
                bar.set_prefix(address);
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                bar
            });
            match event {
                Event::Started { step, .. } => bar.set_message(format!("{step}…")),
                Event::Progress { line, .. } => bar.set_message(line),
                Event::Retrying { step, error, .. } => {
                    bar.set_message(format!("{step}: {error}; retrying"))
                }
                Event::Finished { step, .. } => bar.set_message(format!("{step} done")),
                Event::Failed { step, error, .. } => {
                    bar.abandon_with_message(format!("{step} FAILED: {error}"))
                }
            }
            continue;
        }
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let time = now.get(11..19).unwrap_or(&now);
        let line = match event {
            Event::Progress { address, line } => format!("{address}: {line}"),
            Event::Started { address, step } => format!("{address}: {step}…"),
            Event::Finished {
                address,
                step,
                elapsed,
            } => {
                format!("{address}: {step} done ({:.1}s)", elapsed.as_secs_f64())
            }
            Event::Retrying {
                address,
                step,
                error,
            } => format!("{address}: {step}: {error}; retrying"),
            Event::Failed {
                address,
                step,
                error,
            } => format!("{address}: {step} FAILED: {error}"),
        };
        eprintln!("[{time}] {line}");
    }
    for bar in spinners.values() {
        if !bar.is_finished() {
            bar.finish();
        }
    }
}
