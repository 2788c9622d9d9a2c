//! Gateway vitals for telemetry: uptime, load averages and memory from `/proc`, and the
//! free space of the state directory's file system.
//!
//! Called by the agent when its telemetry timer fires. Reads a few small kernel files and
//! never fails: a value that cannot be read is left out of the message rather than
//! stopping telemetry.

use std::path::Path;

use serde_json::{json, Map, Value};

/// The telemetry body: whatever could be read, plus the caller's `extra` members.
pub fn collect(state_dir: &Path, extra: Map<String, Value>) -> Value {
    let mut body = Map::new();
    if let Some(uptime) = read("/proc/uptime").as_deref().and_then(parse_uptime) {
        body.insert("uptimeSeconds".into(), json!(uptime));
    }
    if let Some([one, five, fifteen]) = read("/proc/loadavg").as_deref().and_then(parse_loadavg) {
        body.insert(
            "load".into(),
            json!({"1m": one, "5m": five, "15m": fifteen}),
        );
    }
    if let Some(text) = read("/proc/meminfo") {
        let mut memory = Map::new();
        for (field, name) in [("MemTotal", "totalKiB"), ("MemAvailable", "availableKiB")] {
            if let Some(kib) = meminfo_kib(&text, field) {
                memory.insert(name.into(), json!(kib));
            }
        }
        if !memory.is_empty() {
            body.insert("memory".into(), Value::Object(memory));
        }
    }
    if let Some(disk) = disk(state_dir) {
        body.insert("stateDisk".into(), disk);
    }
    body.extend(extra);
    Value::Object(body)
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn parse_uptime(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(secs as u64)
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

fn meminfo_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn disk(dir: &Path) -> Option<Value> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let unit = if st.f_frsize > 0 {
        st.f_frsize
    } else {
        st.f_bsize
    };
    Some(json!({
        "totalBytes": st.f_blocks.saturating_mul(unit),
        "availableBytes": st.f_bavail.saturating_mul(unit),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_formats_are_parsed() {
        assert_eq!(parse_uptime("12345.67 4567.89\n"), Some(12345));
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/467 12345\n"),
            Some([0.52, 0.58, 0.59])
        );
        let meminfo = "MemTotal:        2000000 kB\nMemFree:  10 kB\nMemAvailable:    1500000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(2_000_000));
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(1_500_000));
        assert_eq!(meminfo_kib(meminfo, "Mem"), None);
    }

    #[test]
    fn collected_vitals_include_the_callers_members() {
        let dir = tempfile::tempdir().unwrap();
        let extra = json!({"telemetryInterval": 60})
            .as_object()
            .cloned()
            .unwrap();
        let body = collect(dir.path(), extra);
        assert_eq!(body["telemetryInterval"], 60);
        assert!(body["stateDisk"]["totalBytes"].as_u64().unwrap() > 0);
    }
}
