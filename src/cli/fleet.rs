//! `edgetwin fleet apply|status|list|remove|query` (DESIGN §1, §10): rollouts as IoT Hub
//! module configurations, over [`FleetClient`]. The hub connection comes from
//! [`service::connect`], as for `twin`.
//!
//! `--module` defaults to the config's `provisioning.module_id` when a config was read
//! for the connection, else `edgetwin` (the daemon's own default), so a fleet apply
//! targets the module id the gateways' daemons run as.
//!
//! Exit codes of `status`: 0 when every targeted gateway applied, 65 when some refused
//! (and nothing is pending), 69 when some are still pending (at the end of `--wait`).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::Value;

use super::twin::build_patch;
use super::{exit, service, Failure, FleetCommand, HubArgs};
use crate::fleet::status::overall;
use crate::fleet::watch::{watch, Poll};
use crate::fleet::{FleetClient, FleetError, RolloutSpec, RolloutStatus, SpecError, Verdict};

/// The module id when neither `--module` nor a config gives one.
pub const DEFAULT_MODULE: &str = "edgetwin";

/// Runs one `fleet` subcommand; returns the exit code (messages already printed).
pub async fn run(command: FleetCommand) -> u8 {
    let result = match command {
        FleetCommand::Apply {
            hub,
            name,
            target,
            module,
            priority,
            assignments,
        } => apply(&hub, &name, &target, module, priority, &assignments).await,
        FleetCommand::Status {
            hub,
            name,
            wait,
            json,
        } => status(&hub, name.as_deref(), wait, json).await,
        FleetCommand::List { hub, json } => list(&hub, json).await,
        FleetCommand::Remove { hub, name } => remove(&hub, &name).await,
        FleetCommand::Query {
            hub,
            query: text,
            json,
        } => query(&hub, &text, json).await,
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("edgetwin fleet: {}", f.message);
            f.code
        }
    }
}

fn client(hub: &HubArgs) -> Result<(FleetClient, Option<String>), Failure> {
    let service = service::connect(hub)?;
    let module = service
        .settings
        .as_ref()
        .map(|s| s.provisioning.module_id.clone())
        .filter(|m| !m.is_empty());
    Ok((FleetClient::new(service.client), module))
}

/// `fleet apply`: everything checked before the hub is asked; then one configuration.
pub async fn apply(
    hub: &HubArgs,
    name: &str,
    target: &str,
    module: Option<String>,
    priority: Option<i64>,
    assignments: &[String],
) -> Result<u8, Failure> {
    if assignments.is_empty() {
        return Err(FleetError::from(SpecError::NoSettings).into());
    }
    let settings = build_patch(None, assignments).map_err(|m| Failure::new(exit::USAGE, m))?;
    // Bad input is refused before any connection is made.
    RolloutSpec::new(
        name,
        module.as_deref().unwrap_or(DEFAULT_MODULE),
        target,
        priority.unwrap_or(0),
        settings.clone(),
    )
    .map_err(|e| Failure::from(FleetError::from(e)))?;
    let (client, config_module) = client(hub)?;
    let module = module
        .or(config_module)
        .unwrap_or_else(|| DEFAULT_MODULE.to_owned());
    let applied = client
        .apply(name, &module, target, priority, settings)
        .await?;
    let spec = &applied.spec;
    let values: Vec<String> = spec
        .settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "created configuration `{}` (priority {}): {} on module `{}` where {}",
        spec.name,
        spec.priority,
        values.join(" "),
        spec.module,
        spec.target
    );
    println!(
        "the hub applies it at its next evaluation; follow it with `edgetwin fleet status {} --wait 600`",
        spec.name
    );
    Ok(exit::OK)
}

/// `fleet status`: one poll, or polls until settled with `--wait`.
pub async fn status(
    hub: &HubArgs,
    name: Option<&str>,
    wait: Option<u64>,
    json: bool,
) -> Result<u8, Failure> {
    let (client, _) = client(hub)?;
    let (last, timed_out) = match wait {
        None => (client.status(name).await?, false),
        Some(secs) => {
            let mut progress = Progress::new(!json && std::io::stdout().is_terminal(), json);
            let watched = watch(
                client.clock(),
                Duration::from_secs(secs),
                || client.status(name),
                |poll, next| progress.show(poll, next),
            )
            .await?;
            progress.finish();
            (watched.last, watched.timed_out)
        }
    };
    if json {
        let text = serde_json::to_string_pretty(&last.statuses)
            .map_err(|e| Failure::new(exit::SOFTWARE, e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render_statuses(&last));
    }
    verdict(&last.statuses, timed_out.then_some(wait.unwrap_or(0)))
}

/// The exit code for the final statuses (`waited`: the seconds of a `--wait` that ran out).
fn verdict(statuses: &[RolloutStatus], waited: Option<u64>) -> Result<u8, Failure> {
    let rejected: u64 = statuses.iter().map(|s| s.rejected).sum();
    let pending: u64 = statuses.iter().map(|s| s.pending).sum();
    match overall(statuses) {
        Verdict::Applied => Ok(exit::OK),
        Verdict::Rejected => Err(Failure::new(
            exit::DATA,
            format!("{rejected} gateway(s) rejected the rollout (reasons above)"),
        )),
        Verdict::Pending => Err(Failure::new(
            exit::UNAVAILABLE,
            match waited {
                Some(secs) => format!(
                    "{pending} gateway(s) still pending at the end of --wait {secs} \
                     ({rejected} rejected)"
                ),
                None => format!(
                    "{pending} gateway(s) pending ({rejected} rejected); wait with --wait SECS"
                ),
            },
        )),
    }
}

/// `--wait`'s progress: a bar redrawn in place on a terminal, a line per change otherwise,
/// nothing with `--json`.
struct Progress {
    terminal: bool,
    quiet: bool,
    drawn: usize,
    last: Vec<String>,
}

impl Progress {
    fn new(terminal: bool, quiet: bool) -> Self {
        Progress {
            terminal,
            quiet,
            drawn: 0,
            last: Vec::new(),
        }
    }

    fn show(&mut self, poll: &Poll, next: Option<Duration>) {
        if self.quiet {
            return;
        }
        let lines: Vec<String> = poll
            .statuses
            .iter()
            .map(|s| progress_line(s, self.terminal))
            .collect();
        let mut out = std::io::stdout().lock();
        if self.terminal {
            if self.drawn > 0 {
                let _ = write!(out, "\x1b[{}A", self.drawn);
            }
            for line in &lines {
                let _ = writeln!(out, "\r\x1b[K{line}");
            }
            let _ = match next {
                Some(d) => write!(out, "\r\x1b[Knext poll in {} s", d.as_secs()),
                None => write!(out, "\r\x1b[K"),
            };
            self.drawn = lines.len();
        } else if lines != self.last {
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
        self.last = lines;
    }

    fn finish(&mut self) {
        if self.terminal && !self.quiet {
            println!();
        }
    }
}

fn progress_line(s: &RolloutStatus, bar: bool) -> String {
    let counts = format!(
        "{}/{} applied, {} rejected, {} pending",
        s.applied, s.targeted, s.rejected, s.pending
    );
    if !bar {
        return format!("{}: {counts}", s.name);
    }
    const WIDTH: u64 = 30;
    let cells = |n: u64| (n * WIDTH).checked_div(s.targeted).unwrap_or(0) as usize;
    let (ok, bad) = (cells(s.applied), cells(s.rejected));
    let rest = (WIDTH as usize).saturating_sub(ok + bad);
    format!(
        "{} [{}{}{}] {counts}",
        s.name,
        "#".repeat(ok),
        "x".repeat(bad),
        ".".repeat(rest)
    )
}

/// The statuses for people: one block per rollout, the refusals under it.
pub fn render_statuses(poll: &Poll) -> String {
    let mut out = String::new();
    if poll.statuses.is_empty() {
        out.push_str("no edgetwin rollouts in the hub\n");
    }
    for s in &poll.statuses {
        out.push_str(&format!(
            "{} (priority {}): {} targeted, {} applied, {} rejected, {} pending",
            s.name, s.priority, s.targeted, s.applied, s.rejected, s.pending
        ));
        if s.superseded > 0 {
            out.push_str(&format!(
                ", {} superseded (a configuration of higher priority sets the same properties)",
                s.superseded
            ));
        }
        out.push('\n');
        for r in &s.rejections {
            for reason in &r.reasons {
                out.push_str(&format!(
                    "  rejected by {}/{}: {} ac {} {}\n",
                    r.device_id, r.module_id, reason.setting, reason.ac, reason.ad
                ));
            }
        }
    }
    if !poll.skipped.is_empty() {
        out.push_str(&format!(
            "not edgetwin rollouts (not counted): {}\n",
            poll.skipped.join(", ")
        ));
    }
    out
}

/// `fleet list`: the hub's configurations, with the counts of its last evaluation.
pub async fn list(hub: &HubArgs, json: bool) -> Result<u8, Failure> {
    let (client, _) = client(hub)?;
    let configurations = client.configurations().await?;
    if json {
        let text = serde_json::to_string_pretty(&configurations)
            .map_err(|e| Failure::new(exit::SOFTWARE, e.to_string()))?;
        println!("{text}");
        return Ok(exit::OK);
    }
    print!("{}", render_list(&configurations));
    Ok(exit::OK)
}

pub fn render_list(configurations: &[Value]) -> String {
    if configurations.is_empty() {
        return "no configurations in the hub\n".into();
    }
    let mut out = format!(
        "{:<32} {:>8} {:>8} {:>8}  {}\n",
        "NAME", "PRIORITY", "TARGETED", "APPLIED", "TARGET"
    );
    for c in configurations {
        let text = |p: &str| c.pointer(p).and_then(Value::as_str).unwrap_or("");
        let num = |p: &str| {
            c.pointer(p)
                .and_then(Value::as_i64)
                .map_or_else(|| "-".to_owned(), |n| n.to_string())
        };
        out.push_str(&format!(
            "{:<32} {:>8} {:>8} {:>8}  {}\n",
            text("/id"),
            num("/priority"),
            num("/systemMetrics/results/targetedCount"),
            num("/systemMetrics/results/appliedCount"),
            text("/targetCondition"),
        ));
    }
    out.push_str(
        "(the hub's counts at its last evaluation; APPLIED: its values written to the twin. \
         What the gateways acknowledged: edgetwin fleet status)\n",
    );
    out
}

/// `fleet remove`.
pub async fn remove(hub: &HubArgs, name: &str) -> Result<u8, Failure> {
    let (client, _) = client(hub)?;
    client.remove(name).await?;
    println!(
        "removed configuration `{name}`: at the hub's next evaluation its gateways take the \
         values of the next configuration by priority that targets them, or keep theirs"
    );
    Ok(exit::OK)
}

/// `fleet query`: every page; one compact row per line, or one JSON array.
pub async fn query(hub: &HubArgs, query: &str, json: bool) -> Result<u8, Failure> {
    let (client, _) = client(hub)?;
    let rows = client.query(query).await?;
    let fail = |e: serde_json::Error| Failure::new(exit::SOFTWARE, e.to_string());
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).map_err(fail)?);
    } else {
        for row in &rows {
            println!("{}", serde_json::to_string(row).map_err(fail)?);
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::status::{Reason, Rejection};
    use serde_json::json;

    fn status(applied: u64, rejected: u64, pending: u64) -> RolloutStatus {
        RolloutStatus {
            name: "interval-30".into(),
            priority: 10,
            targeted: applied + rejected + pending,
            applied,
            rejected,
            superseded: 0,
            pending,
            rejections: (0..rejected)
                .map(|i| Rejection {
                    device_id: format!("gw{i}"),
                    module_id: "edgetwin".into(),
                    reasons: vec![Reason {
                        setting: "telemetryInterval".into(),
                        ac: 400,
                        ad: "0 is below the minimum 1".into(),
                    }],
                })
                .collect(),
        }
    }

    #[test]
    fn statuses_name_the_rejecting_gateways_and_their_reasons() {
        let poll = Poll {
            statuses: vec![status(28, 2, 0)],
            skipped: vec!["edge-deployment".into()],
            ..Poll::default()
        };
        let text = render_statuses(&poll);
        assert!(
            text.starts_with(
                "interval-30 (priority 10): 30 targeted, 28 applied, 2 rejected, 0 pending\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  rejected by gw1/edgetwin: telemetryInterval ac 400 0 is below the minimum 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("not counted): edge-deployment"), "{text}");
    }

    #[test]
    fn exit_codes_follow_the_verdict() {
        assert_eq!(verdict(&[status(3, 0, 0)], None).unwrap(), exit::OK);
        assert_eq!(verdict(&[], None).unwrap(), exit::OK);
        assert_eq!(
            verdict(&[status(2, 1, 0)], None).unwrap_err().code,
            exit::DATA
        );
        let timeout = verdict(&[status(2, 1, 1)], Some(60)).unwrap_err();
        assert_eq!(timeout.code, exit::UNAVAILABLE);
        assert!(
            timeout.message.contains("at the end of --wait 60"),
            "{}",
            timeout.message
        );
    }

    #[test]
    fn the_bar_shows_applied_and_rejected_shares() {
        let line = progress_line(&status(15, 3, 12), true);
        assert_eq!(
            line,
            format!(
                "interval-30 [{}{}{}] 15/30 applied, 3 rejected, 12 pending",
                "#".repeat(15),
                "x".repeat(3),
                ".".repeat(12)
            )
        );
        assert_eq!(
            progress_line(&status(0, 0, 0), false),
            "interval-30: 0/0 applied, 0 rejected, 0 pending"
        );
    }

    #[test]
    fn the_list_shows_the_hubs_last_counts() {
        let text = render_list(&[json!({"id": "a", "priority": 10,
            "targetCondition": "FROM devices.modules WHERE moduleId = 'edgetwin' AND (true)",
            "systemMetrics": {"results": {"targetedCount": 30, "appliedCount": 29}}})]);
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("a "), "{text}");
        assert!(row.contains("      10       30       29  FROM"), "{text}");
    }
}
