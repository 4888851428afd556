//! Scheduled snapshots and retention, the decisions: the TOML configuration, when a period is
//! due, what its retention keeps, and what expiry prunes. Pure functions over snapshot lists;
//! [`super`] carries them out through a [`crate::ops::Client`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{Error, Result};
use crate::names::{parse_duration, rfc3339};
use crate::store::Snapshot;

pub const DEFAULT_CONFIG: &str = "/etc/snapctl/snapctl.toml";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCfg {
    #[serde(default)]
    store: BTreeMap<String, Spanned<StoreCfg>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreCfg {
    path: Spanned<String>,
    #[serde(default)]
    period: Vec<Spanned<PeriodCfg>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeriodCfg {
    name: Spanned<String>,
    every: Spanned<String>,
    keep: Option<Spanned<u64>>,
    retain: Option<Spanned<String>>,
    #[serde(default)]
    freeze: Vec<String>,
    pre_hook: Option<String>,
    post_hook: Option<String>,
    hook_timeout: Option<Spanned<String>>,
}

/// One snapshot period of a store.
#[derive(Debug, Clone, Serialize)]
pub struct Period {
    pub name: String,
    /// Seconds between snapshots; due on multiples of it in UTC (weeks start on Monday).
    pub every: i64,
    pub keep: Option<u64>,
    /// Seconds: snapshots younger than this are kept.
    pub retain: Option<i64>,
    pub freeze: Vec<PathBuf>,
    pub pre_hook: Option<String>,
    pub post_hook: Option<String>,
    /// Seconds after which a hook still running is killed.
    pub hook_timeout: i64,
}

/// A hook still running after this long is killed (`hook_timeout`, `--hook-timeout`).
pub const DEFAULT_HOOK_TIMEOUT: i64 = 600;

#[derive(Debug, Clone, Serialize)]
pub struct StoreConfig {
    pub name: String,
    pub path: PathBuf,
    pub periods: Vec<Period>,
}

fn line_of(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())].matches('\n').count() + 1
}

/// Reads and validates the configuration; every error names the file, the line and the key.
/// `check_store` verifies that a store path holds a snapctl store.
pub fn load(path: &Path, check_store: &dyn Fn(&Path) -> Result<()>) -> Result<Vec<StoreConfig>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!(
            "config {}: no such file (give --config FILE or set SNAPCTL_CONFIG)",
            path.display()
        )),
        // A directory or a binary file given by mistake: the user's to fix, not an I/O failure.
        std::io::ErrorKind::InvalidData => Error::Invalid(format!(
            "config {} is not UTF-8 text; give the TOML configuration file",
            path.display()
        )),
        _ if e.raw_os_error() == Some(libc::EISDIR) => Error::Invalid(format!(
            "config {} is a directory; give the TOML configuration file",
            path.display()
        )),
        _ => Error::io(format!("config {}", path.display()), e),
    })?;
    parse(&text, path, check_store)
}

pub fn parse(
    text: &str,
    path: &Path,
    check_store: &dyn Fn(&Path) -> Result<()>,
) -> Result<Vec<StoreConfig>> {
    let file = path.display();
    let at = |span: std::ops::Range<usize>, msg: String| {
        Error::Invalid(format!("{file}:{}: {msg}", line_of(text, span.start)))
    };
    let cfg: FileCfg = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        // The parser's message may span lines ("invalid table header\nexpected `.`, `]`").
        let msg = e.message().trim().lines().collect::<Vec<_>>().join("; ");
        // "invalid type: string \"three\", expected u64" does not say which key: its line does.
        let key = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !msg.contains(&format!("`{k}`")));
        match key {
            Some(k) => Error::Invalid(format!("{file}:{line}: {k}: {msg}")),
            None => Error::Invalid(format!("{file}:{line}: {msg}")),
        }
    })?;
    let mut out = Vec::new();
    for (sname, st) in cfg.store {
        let st_span = st.span();
        let st = st.into_inner();
        let spath = PathBuf::from(st.path.get_ref());
        check_store(&spath).map_err(|e| at(st.path.span(), format!("store.{sname}.path: {e}")))?;
        if st.period.is_empty() {
            return Err(at(
                st_span,
                format!("store.{sname} has no [[store.{sname}.period]]"),
            ));
        }
        let mut periods: Vec<Period> = Vec::new();
        for p in st.period {
            let p_span = p.span();
            let p = p.into_inner();
            let name = p.name.get_ref().clone();
            crate::names::validate(&name)
                .map_err(|e| at(p.name.span(), format!("store.{sname}.period name: {e}")))?;
            if periods.iter().any(|q| q.name == name) {
                return Err(at(
                    p.name.span(),
                    format!("store.{sname}: period '{name}' is named twice"),
                ));
            }
            let every = parse_duration(p.every.get_ref()).ok_or_else(|| {
                at(
                    p.every.span(),
                    format!(
                        "store.{sname}.period '{name}': every = '{}' is not a duration (30m, 1h, 1d, 1w)",
                        p.every.get_ref()
                    ),
                )
            })?;
            let retain = match &p.retain {
                Some(r) => Some(parse_duration(r.get_ref()).ok_or_else(|| {
                    at(
                        r.span(),
                        format!(
                            "store.{sname}.period '{name}': retain = '{}' is not a duration (12h, 2d, 4w)",
                            r.get_ref()
                        ),
                    )
                })?),
                None => None,
            };
            let hook_timeout = match &p.hook_timeout {
                Some(t) => parse_duration(t.get_ref()).ok_or_else(|| {
                    at(
                        t.span(),
                        format!(
                            "store.{sname}.period '{name}': hook_timeout = '{}' is not a duration (30s, 10m)",
                            t.get_ref()
                        ),
                    )
                })?,
                None => DEFAULT_HOOK_TIMEOUT,
            };
            let keep = p.keep.as_ref().map(|k| *k.get_ref());
            if keep.is_none() && retain.is_none() {
                return Err(at(
                    p_span,
                    format!("store.{sname}.period '{name}' needs keep or retain (or both)"),
                ));
            }
            if keep == Some(0) && retain.is_none() {
                return Err(at(
                    p.keep.as_ref().map(|k| k.span()).unwrap_or(p_span),
                    format!("store.{sname}.period '{name}': keep = 0 would delete every snapshot it takes"),
                ));
            }
            periods.push(Period {
                name,
                every,
                keep,
                retain,
                freeze: p.freeze.iter().map(PathBuf::from).collect(),
                pre_hook: p.pre_hook,
                post_hook: p.post_hook,
                hook_timeout,
            });
        }
        out.push(StoreConfig {
            name: sname,
            path: spath,
            periods,
        });
    }
    Ok(out)
}

const WEEK: i64 = 7 * 86400;
/// 1970-01-05 was a Monday: weekly boundaries fall on Mondays, 00:00 UTC.
const MONDAY: i64 = 4 * 86400;

/// The latest period boundary at or before `now`.
pub fn boundary(every: i64, now: i64) -> i64 {
    let origin = if every % WEEK == 0 { MONDAY } else { 0 };
    (now - origin).div_euclid(every) * every + origin
}

/// `hourly-20261122T100000Z`: the period's name and its boundary.
pub fn snapshot_name(period: &str, boundary: i64) -> String {
    let t = chrono::DateTime::from_timestamp(boundary, 0)
        .map(|d| d.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|| boundary.to_string());
    format!("{period}-{t}")
}

/// The period a snapshot was taken for (its `period` label).
fn period_of(s: &Snapshot) -> Option<&str> {
    s.labels.get("period").map(|s| s.as_str())
}

/// A decision about one snapshot, with the rule that made it.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    pub delete: bool,
    pub rule: String,
}

/// Is the period's snapshot for the current boundary missing? Returns the name to take.
pub fn due(p: &Period, snaps: &[Snapshot], now: i64) -> Option<String> {
    let b = boundary(p.every, now);
    let taken = snaps
        .iter()
        .any(|s| period_of(s) == Some(p.name.as_str()) && s.created >= b);
    let name = snapshot_name(&p.name, b);
    if taken || snaps.iter().any(|s| s.name == name) {
        None
    } else {
        Some(name)
    }
}

/// Retention for one period: the newest `keep` and/or those younger than `retain` are kept.
/// Only snapshots labelled `period=<name>` are considered.
pub fn retention(p: &Period, snaps: &[Snapshot], now: i64) -> Vec<Verdict> {
    let mut mine: Vec<&Snapshot> = snaps
        .iter()
        .filter(|s| period_of(s) == Some(p.name.as_str()))
        .collect();
    mine.sort_by_key(|s| std::cmp::Reverse(s.created));
    mine.iter()
        .enumerate()
        .map(|(i, s)| {
            let by_keep = p.keep.is_some_and(|k| (i as u64) < k);
            // A control client may stamp any creation time: an age must not overflow.
            let age = now.saturating_sub(s.created);
            let by_retain = p.retain.is_some_and(|r| age < r);
            let rule = if by_keep {
                format!(
                    "period {}: among the newest {}",
                    p.name,
                    p.keep.unwrap_or(0)
                )
            } else if by_retain {
                format!("period {}: younger than its retain", p.name)
            } else {
                format!(
                    "period {}: beyond its retention ({}{})",
                    p.name,
                    p.keep.map(|k| format!("keep {k}")).unwrap_or_default(),
                    p.retain
                        .map(|r| format!(
                            "{}retain {r} s",
                            if p.keep.is_some() { ", " } else { "" }
                        ))
                        .unwrap_or_default()
                )
            };
            Verdict {
                name: s.name.clone(),
                delete: !(by_keep || by_retain),
                rule,
            }
        })
        .collect()
}

/// Expiry: every snapshot whose `expires` is at or before `now` goes.
pub fn expiry(snaps: &[Snapshot], now: i64) -> Vec<Verdict> {
    snaps
        .iter()
        .map(|s| match s.expires {
            Some(e) if e <= now => Verdict {
                name: s.name.clone(),
                delete: true,
                rule: format!("expired at {}", rfc3339(e)),
            },
            Some(e) => Verdict {
                name: s.name.clone(),
                delete: false,
                rule: format!("expires at {}", rfc3339(e)),
            },
            None => Verdict {
                name: s.name.clone(),
                delete: false,
                rule: "no expiry".into(),
            },
        })
        .collect()
}

/// How late a period may be before `schedule status` calls it overdue: a tenth of the period,
/// at most 15 minutes (cron and timers start a little after the boundary).
pub fn grace(every: i64) -> i64 {
    (every / 10).min(900)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, created: i64, period: Option<&str>) -> Snapshot {
        let mut labels = BTreeMap::new();
        if let Some(p) = period {
            labels.insert("period".into(), p.into());
        }
        Snapshot::point(0, name, "origin", 0, 0, created, None, labels)
    }

    fn hourly(keep: Option<u64>, retain: Option<i64>) -> Period {
        Period {
            name: "hourly".into(),
            every: 3600,
            keep,
            retain,
            freeze: vec![],
            pre_hook: None,
            post_hook: None,
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }

    #[test]
    fn boundaries_are_utc_multiples_and_weeks_start_on_monday() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:42:13Z")
            .unwrap()
            .timestamp();
        assert_eq!(rfc3339(boundary(3600, t)), "2026-11-22T10:00:00Z");
        assert_eq!(rfc3339(boundary(86400, t)), "2026-11-22T00:00:00Z");
        assert_eq!(rfc3339(boundary(7 * 86400, t)), "2026-11-16T00:00:00Z"); // a Monday
        assert_eq!(
            snapshot_name("hourly", boundary(3600, t)),
            "hourly-20261122T100000Z"
        );
    }

    #[test]
    fn one_snapshot_per_period_and_one_catch_up_after_downtime() {
        let p = hourly(Some(3), None);
        let t = 1_800_000_000 + 120; // 1_800_000_000 is on the hour
        assert!(due(&p, &[], t).is_some());
        let taken = vec![snap(&snapshot_name("hourly", t - 120), t, Some("hourly"))];
        assert_eq!(due(&p, &taken, t + 600), None);
        // ten hours down: one catch-up, named for the current boundary
        let later = t + 10 * 3600;
        assert_eq!(
            due(&p, &taken, later),
            Some(snapshot_name("hourly", boundary(3600, later)))
        );
    }

    #[test]
    fn retention_keeps_the_newest_or_the_young_and_ignores_other_snapshots() {
        let now = 1_800_000_000;
        let snaps: Vec<Snapshot> = (0..5)
            .map(|i| snap(&format!("h{i}"), now - i * 3600, Some("hourly")))
            .chain([snap("manual", now - 99 * 3600, None)])
            .collect();
        let v = retention(&hourly(Some(2), None), &snaps, now);
        let del: Vec<&str> = v
            .iter()
            .filter(|v| v.delete)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(del, ["h2", "h3", "h4"]);
        let v = retention(&hourly(Some(1), Some(3 * 3600 + 1)), &snaps, now);
        let del: Vec<&str> = v
            .iter()
            .filter(|v| v.delete)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(del, ["h4"]);
    }

    /// A control client may stamp any creation time; the age of such a snapshot saturates
    /// instead of wrapping into "younger than its retain" (found by the config fuzz target).
    #[test]
    fn retention_of_snapshots_stamped_at_the_ends_of_time() {
        let now = 1_800_000_000;
        let snaps = [
            snap("ancient", i64::MIN, Some("hourly")),
            snap("future", i64::MAX, Some("hourly")),
        ];
        let v = retention(&hourly(None, Some(3600)), &snaps, now);
        let del: Vec<&str> = v
            .iter()
            .filter(|v| v.delete)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(del, ["ancient"]);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../../scripts/snapctl.toml.example");
        let cfg = parse(text, Path::new("snapctl.toml.example"), &|_: &Path| Ok(())).unwrap();
        assert_eq!(cfg[0].periods.len(), 2);
        assert_eq!(cfg[0].periods[0].freeze, [PathBuf::from("/srv/db")]);
    }

    #[test]
    fn config_errors_name_the_file_line_and_key() {
        let ok = |_: &Path| Ok(());
        let p = Path::new("/etc/snapctl/snapctl.toml");
        let bad = [
            ("[store.db]\npath = \"/x\"\n[[store.db.period]]\nname = \"h\"\nevery = \"1h\"\nkeep = 3\nbogus = 1\n", ":7:", "bogus"),
            ("[store.db]\npath = \"/x\"\n[[store.db.period]]\nname = \"h\"\nevery = \"often\"\nkeep = 3\n", ":5:", "every"),
            ("[store.db]\npath = \"/x\"\n[[store.db.period]]\nname = \"h\"\nevery = \"1h\"\n", ":3:", "keep or retain"),
            ("[store.db]\npath = \"/x\"\n[[store.db.period]]\nname = \"h\"\nevery = \"1h\"\nretain = \"soon\"\n", ":6:", "retain"),
        ];
        for (text, line, key) in bad {
            let e = parse(text, p, &ok).unwrap_err().to_string();
            assert!(
                e.contains("snapctl.toml") && e.contains(line) && e.contains(key),
                "{e}"
            );
        }
        let notstore = |_: &Path| Err(Error::not_a_store("x"));
        let e = parse("[store.db]\npath = \"/x\"\n[[store.db.period]]\nname = \"h\"\nevery = \"1h\"\nkeep = 1\n", p, &notstore)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":2:") && e.contains("not a snapctl store"),
            "{e}"
        );
    }
}
