//! Scheduled snapshots, retention and expiry, carried out: `schedule run`, `schedule status`
//! and `prune` over the stores of a configuration file (or one store). Each store is reached
//! through its own [`Client`], so a running server is used when there is one, and the caller's
//! configuration and environment are the only ones that count.

pub mod policy;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::consistent::{self, Around};
use super::{Client, CreateSpec, Request, Response};
use crate::error::{Error, Result};
use crate::store::Snapshot;
use policy::{StoreConfig, Verdict};

/// How a caller reaches a store (a function so tests and callers choose).
pub type Connect<'a> = &'a dyn Fn(&Path) -> Result<Box<dyn Client>>;

/// The stores of `config` (each checked to be a store).
pub fn load_config(config: &Path) -> Result<Vec<StoreConfig>> {
    policy::load(config, &|p: &Path| {
        if !p.exists() {
            return Err(Error::NotFound(format!(
                "{}: no such file or device",
                p.display()
            )));
        }
        crate::store::peek_superblock(p)
            .map(|_| ())
            .ok_or_else(|| Error::not_a_store(p.display()))
    })
}

/// The snapshots of a store.
pub fn list(client: &mut dyn Client) -> Result<Vec<Snapshot>> {
    match client.ask(Request::List)?.response {
        Response::List { snapshots, .. } => Ok(snapshots),
        other => Err(unexpected("list", &other)),
    }
}

fn unexpected(what: &str, r: &Response) -> Error {
    Error::Corrupt(format!("{what} was answered with {r:?}"))
}

/// Deletes one snapshot; false when it was already gone (another run got there first).
fn delete_quietly(client: &mut dyn Client, name: &str) -> Result<bool> {
    match client.ask(Request::Delete {
        names: vec![name.to_string()],
        force: false,
    }) {
        Ok(_) => Ok(true),
        Err(Error::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What `prune` did to one store.
#[derive(Debug, Clone, Serialize)]
pub struct Pruned {
    pub store: String,
    pub considered: Vec<Verdict>,
    pub deleted: Vec<String>,
}

/// Deletes the expired snapshots of each store (none with `dry_run`), as if it were `now`.
pub fn prune(
    stores: &[PathBuf],
    connect: Connect<'_>,
    now: i64,
    dry_run: bool,
) -> Result<Vec<Pruned>> {
    let mut out = Vec::new();
    for st in stores {
        let mut c = connect(st)?;
        let snaps = list(c.as_mut())?;
        let considered = policy::expiry(&snaps, now);
        let mut deleted = Vec::new();
        for v in considered.iter().filter(|v| v.delete) {
            if !dry_run && delete_quietly(c.as_mut(), &v.name)? {
                deleted.push(v.name.clone());
            }
        }
        out.push(Pruned {
            store: st.display().to_string(),
            considered,
            deleted,
        });
    }
    Ok(out)
}

/// One thing `schedule run` did or would do, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    Take { name: String, period: String },
    Failed { period: String, error: String },
    Delete { name: String, reason: String },
}

/// What `schedule run` did to one store.
#[derive(Debug, Clone, Serialize)]
pub struct Ran {
    pub store: String,
    pub path: PathBuf,
    pub actions: Vec<Action>,
}

impl Ran {
    pub fn failed(&self) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Failed { .. }))
    }
}

/// Takes the snapshots that are due and deletes what retention and expiry release, for each
/// store of `stores` (only `only` when given), as if it were `now`. `stamp` gives new snapshots
/// the creation time `now` (a run for another time than the present).
pub fn run(
    stores: &[StoreConfig],
    connect: Connect<'_>,
    now: i64,
    stamp: bool,
    dry_run: bool,
    quiet: bool,
) -> Result<Vec<Ran>> {
    let mut out = Vec::new();
    for st in stores {
        let mut c = connect(&st.path)?;
        let mut actions = Vec::new();
        let mut snaps = list(c.as_mut())?;
        for p in &st.periods {
            let Some(name) = policy::due(p, &snaps, now) else {
                continue;
            };
            let labels = [("period".to_string(), p.name.clone())]
                .into_iter()
                .collect();
            if dry_run {
                // Retention below sees it as taken.
                snaps.push(Snapshot::point(0, &name, "origin", 0, 0, now, None, labels));
                actions.push(Action::Take {
                    name,
                    period: p.name.clone(),
                });
                continue;
            }
            let spec = CreateSpec {
                name: name.clone(),
                labels,
                created: stamp.then_some(now),
                ..CreateSpec::default()
            };
            let around = Around {
                freeze: p.freeze.clone(),
                freeze_timeout: 30,
                hook_timeout: p.hook_timeout,
                pre_hook: p.pre_hook.clone(),
                post_hook: p.post_hook.clone(),
            };
            match consistent::create(c.as_mut(), &st.path, spec, &around, quiet) {
                Ok(_) => actions.push(Action::Take {
                    name,
                    period: p.name.clone(),
                }),
                // Another run took it a moment ago: nothing to do.
                Err(Error::Exists(_)) => {}
                Err(e) => actions.push(Action::Failed {
                    period: p.name.clone(),
                    error: e.to_string(),
                }),
            }
        }
        if !dry_run {
            snaps = list(c.as_mut())?;
        }
        let mut verdicts: Vec<Verdict> = Vec::new();
        for p in &st.periods {
            verdicts.extend(policy::retention(p, &snaps, now));
        }
        verdicts.extend(policy::expiry(&snaps, now).into_iter().filter(|v| v.delete));
        let mut seen = HashSet::new();
        for v in verdicts.into_iter().filter(|v| v.delete) {
            if !seen.insert(v.name.clone()) {
                continue;
            }
            if dry_run || delete_quietly(c.as_mut(), &v.name)? {
                actions.push(Action::Delete {
                    name: v.name,
                    reason: v.rule,
                });
            }
        }
        out.push(Ran {
            store: st.name.clone(),
            path: st.path.clone(),
            actions,
        });
    }
    Ok(out)
}

/// One period's state in `schedule status`.
#[derive(Debug, Clone, Serialize)]
pub struct PeriodStatus {
    pub store: String,
    pub period: String,
    pub newest: Option<String>,
    /// Unix seconds.
    pub newest_created: Option<i64>,
    pub next_due: i64,
    pub overdue: bool,
}

/// The newest snapshot of every period of every store, when the next is due, which are late.
pub fn status(stores: &[StoreConfig], connect: Connect<'_>, now: i64) -> Result<Vec<PeriodStatus>> {
    let mut rows = Vec::new();
    for st in stores {
        let snaps = list(connect(&st.path)?.as_mut())?;
        for p in &st.periods {
            let newest = snaps
                .iter()
                .filter(|s| s.labels.get("period") == Some(&p.name))
                .max_by_key(|s| s.created);
            let b = policy::boundary(p.every, now);
            let taken = newest.is_some_and(|s| s.created >= b);
            rows.push(PeriodStatus {
                store: st.name.clone(),
                period: p.name.clone(),
                newest: newest.map(|s| s.name.clone()),
                newest_created: newest.map(|s| s.created),
                // A period of centuries may end after the last representable second.
                next_due: if taken { b.saturating_add(p.every) } else { b },
                overdue: !taken && now > b + policy::grace(p.every),
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Reply;

    /// Answers `list` with one snapshot.
    struct One(Snapshot);

    impl Client for One {
        fn call(
            &mut self,
            _: Request,
            _: super::super::Data,
            _: super::super::Progress<'_>,
        ) -> Result<Reply> {
            Ok(Reply {
                response: Response::List {
                    store: "s".into(),
                    chunk_size: 4096,
                    snapshots: vec![self.0.clone()],
                },
                events: Vec::new(),
            })
        }
        fn remote(&self) -> bool {
            false
        }
    }

    /// A period of almost 2^63 seconds, taken: its next boundary lies past the last second an
    /// i64 holds, and says so instead of wrapping into the past (found by the config fuzz target).
    #[test]
    fn the_next_due_time_of_a_period_of_centuries_saturates() {
        let text = format!(
            "[store.s]\npath = \"/x\"\n[[store.s.period]]\nname = \"w\"\nevery = \"{}w\"\nkeep = 1\n",
            i64::MAX / (7 * 86400)
        );
        let stores = policy::parse(&text, Path::new("t.toml"), &|_: &Path| Ok(())).unwrap();
        let labels = [("period".to_string(), "w".to_string())]
            .into_iter()
            .collect();
        let snap = Snapshot::point(1, "w-1", "origin", 0, 0, 1_000_000, None, labels);
        let connect = |_: &Path| -> Result<Box<dyn Client>> { Ok(Box::new(One(snap.clone()))) };
        let rows = status(&stores, &connect, 1_800_000_000).unwrap();
        assert_eq!(rows[0].next_due, i64::MAX);
    }
}
