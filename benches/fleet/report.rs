//! What the fleet bench prints: each fleet size's raw figures, then one table of how they
//! grow with N and their ratio to the bound the tier's rates set.

#[derive(Default)]
pub struct Figures {
    pub n: usize,
    pub cold: f64,
    pub cold_bound: f64,
    pub cold_peaks: (u64, u64),
    pub cold_throttled: (u64, u64),
    pub rollout_how: &'static str,
    pub rollout_applied: f64,
    pub rollout_acked: f64,
    pub rollout_bound: f64,
    pub rollout_429_rest: u64,
    pub rollout_throttled_updates: u64,
    pub resync_connected: f64,
    pub resync_applied: f64,
    pub resync_acked: f64,
    pub resync_bound: f64,
    pub resync_peaks: (u64, u64, u64),
    pub resync_throttled: (u64, u64, u64),
    pub lost: usize,
}

/// `time / bound`, or `-` when everything fitted in the burst (bound 0).
pub fn ratio_text(time: f64, bound: f64) -> String {
    if bound > 0.0 {
        format!("{:.2}", time / bound)
    } else {
        "-".into()
    }
}

pub fn print_raw(f: &Figures, limits: (f64, f64, f64)) {
    let (conn, read, update) = limits;
    println!("\n== fleet of {} gateways ==", f.n);
    println!(
        "cold start: all connected + twin read in {:.2} s (bound {:.2} s, ratio {}); \
         peak {} connects/s (limit {conn}), {} twin reads/s (limit {read}); \
         throttled: {} connects, {} twin reads",
        f.cold,
        f.cold_bound,
        ratio_text(f.cold, f.cold_bound),
        f.cold_peaks.0,
        f.cold_peaks.1,
        f.cold_throttled.0,
        f.cold_throttled.1
    );
    println!(
        "rollout ({}): all applied in {:.2} s, all acked in \
         {:.2} s (bound {:.2} s, ratio {}); 429s: {} to the operator, {} twin updates \
         in all (limit {update}/s)",
        f.rollout_how,
        f.rollout_applied,
        f.rollout_acked,
        f.rollout_bound,
        ratio_text(f.rollout_acked, f.rollout_bound),
        f.rollout_429_rest,
        f.rollout_throttled_updates
    );
    println!(
        "outage and restart: all reconnected in {:.2} s, resynced (applied) in {:.2} s, acked in \
         {:.2} s (bound {:.2} s, ratio {}); peak {} connects/s, {} twin reads/s, {} twin \
         updates/s; throttled: {} connects, {} twin reads, {} twin updates; lost versions: {}",
        f.resync_connected,
        f.resync_applied,
        f.resync_acked,
        f.resync_bound,
        ratio_text(f.resync_acked, f.resync_bound),
        f.resync_peaks.0,
        f.resync_peaks.1,
        f.resync_peaks.2,
        f.resync_throttled.0,
        f.resync_throttled.1,
        f.resync_throttled.2,
        f.lost
    );
}

pub fn print_table(all: &[Figures]) {
    println!(
        "\n| figure | {} |",
        all.iter()
            .map(|f| format!("N = {}", f.n))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(all.len()));
    let row = |name: &str, cell: &dyn Fn(&Figures) -> String| {
        println!(
            "| {name} | {} |",
            all.iter().map(cell).collect::<Vec<_>>().join(" | ")
        );
    };
    let ratio = |t: f64, b: f64| {
        if b > 0.0 {
            format!("{t:.1} s ({:.2}× bound {b:.1} s)", t / b)
        } else {
            format!("{t:.1} s (within the burst)")
        }
    };
    row("cold start: connected + twin read", &|f| {
        ratio(f.cold, f.cold_bound)
    });
    row("cold start: peak connects/s, twin reads/s", &|f| {
        format!("{}, {}", f.cold_peaks.0, f.cold_peaks.1)
    });
    row("cold start: throttled connects, twin reads", &|f| {
        format!("{}, {}", f.cold_throttled.0, f.cold_throttled.1)
    });
    row("rollout: all applied", &|f| {
        format!("{:.1} s", f.rollout_applied)
    });
    row("rollout: all acked", &|f| {
        ratio(f.rollout_acked, f.rollout_bound)
    });
    row(
        "rollout: 429s to the operator, throttled twin updates",
        &|f| format!("{}, {}", f.rollout_429_rest, f.rollout_throttled_updates),
    );
    row("outage: all reconnected", &|f| {
        format!("{:.1} s", f.resync_connected)
    });
    row("outage: all resynced (applied)", &|f| {
        format!("{:.1} s", f.resync_applied)
    });
    row("outage: all acked", &|f| {
        ratio(f.resync_acked, f.resync_bound)
    });
    row("outage: peak connects/s, reads/s, updates/s", &|f| {
        format!(
            "{}, {}, {}",
            f.resync_peaks.0, f.resync_peaks.1, f.resync_peaks.2
        )
    });
    row("outage: throttled connects, reads, updates", &|f| {
        format!(
            "{}, {}, {}",
            f.resync_throttled.0, f.resync_throttled.1, f.resync_throttled.2
        )
    });
    row("lost versions", &|f| f.lost.to_string());
}
