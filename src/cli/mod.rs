//! The command line: arguments → a typed request → a [`Client`] → rendered output. Parsing
//! (what users type) happens here and nowhere else; the work happens in [`crate::ops`]; what is
//! printed comes from [`render`]. Files the user names are opened here, with the user's rights.

pub mod args;
mod docs;
mod files;
mod interrupt;
pub mod render;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Parser;

pub use args::{Cli, Cmd, Global, OnFullArg, ScheduleCmd};
pub use docs::generate_docs;
pub use render::Output;

use crate::error::{Error, Result};
use crate::names::{parse_expiry, parse_size};
use crate::ops::consistent::{self, Around};
use crate::ops::schedule;
use crate::ops::{self, Client, CreateSpec, Request, Response};
use crate::store::format::OnFull;
use crate::store::InitOptions;
use render::Style;

/// Entry point: returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help and --version: their text, as clap prints it.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            let json = std::env::args_os()
                .take_while(|a| a != "--")
                .any(|a| a == "--json");
            let command = subcommand_named();
            let help = clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand;
            let e = match e.kind() {
                // `snapctl` or `snapctl schedule` alone: the help is the answer (exit 2).
                k if k == help && !json => {
                    let _ = e.print();
                    return 2;
                }
                k if k == help => {
                    Error::Invalid(format!("no command given; see `{command} --help`"))
                }
                _ => Error::Invalid(usage_error(&e.to_string(), &command)),
            };
            report(json, &e);
            return e.exit_code();
        }
    };
    let json = cli.global.json;
    std::panic::set_hook(Box::new(|_| {}));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)));
    let _ = std::panic::take_hook();
    match res {
        Ok(Ok(out)) => emit(&out),
        Ok(Err(e)) => {
            report(json, &e);
            e.exit_code()
        }
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let e = Error::Internal(format!(
                "internal error ({what}); the store's metadata may be damaged: run `snapctl check`"
            ));
            report(json, &e);
            e.exit_code()
        }
    }
}

/// clap's usage error (several lines: the error, tips, the usage, a pointer to --help) as one
/// line: what is wrong, the tips, and which --help to read (`command`'s).
fn usage_error(text: &str, command: &str) -> String {
    let (mut what, mut tips) = (Vec::new(), Vec::new());
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(tip) = line.strip_prefix("tip: ") {
            tips.push(tip);
        } else if !line.starts_with("Usage: ") && !line.starts_with("For more information") {
            what.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    let mut msg = what.join(" ");
    for t in tips {
        msg.push_str(&format!(" ({t})"));
    }
    format!("{msg}; see `{command} --help`")
}

/// The (sub)command the command line names, as far as it names one: `snapctl schedule run`.
fn subcommand_named() -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut path = vec!["snapctl".to_string()];
    for a in std::env::args().skip(1) {
        let Some(sub) = cmd.find_subcommand(&a).cloned() else {
            continue;
        };
        path.push(sub.get_name().to_string());
        cmd = sub;
    }
    path.join(" ")
}

/// An error as one line on stderr (or one JSON object). Control characters a user typed into a
/// name (a newline, an escape sequence) are shown escaped: they must not break the line or
/// reach the terminal.
fn report(json: bool, e: &Error) {
    let mut message = String::new();
    for c in e.to_string().chars() {
        if c.is_control() {
            message.extend(c.escape_default());
        } else {
            message.push(c);
        }
    }
    if json {
        let v = serde_json::json!({"schema_version": 1, "error": {"kind": e.kind(), "message": message}});
        eprintln!("{v}");
    } else {
        eprintln!("snapctl: {message}");
    }
}

fn emit(out: &Output) -> i32 {
    let mut so = std::io::stdout().lock();
    match so.write_all(out.text.as_bytes()).and_then(|_| so.flush()) {
        Ok(()) => out.code,
        // `snapctl list | head`: a closed pipe is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => out.code,
        Err(e) => {
            eprintln!("snapctl: stdout: {e}");
            1
        }
    }
}

fn store_path(g: &Global) -> Result<&Path> {
    g.store
        .as_deref()
        .ok_or_else(|| Error::Invalid("no store given: pass -s STORE or set SNAPCTL_STORE".into()))
}

/// The client of the store `-s` names: its server's, or this process's.
fn client(g: &Global) -> Result<Box<dyn Client>> {
    ops::connect(store_path(g)?, g.verbose > 0 && !g.json)
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("--label '{l}' is not KEY=VALUE")))?;
        crate::names::validate_label(k, v).map_err(|m| Error::Invalid(format!("--{m}")))?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Error::Invalid(format!(
                "--label '{k}' is given twice; give each key once"
            )));
        }
    }
    Ok(out)
}

/// `--now` (or `--created-at`, named by `opt`): an RFC 3339 time; none means now.
fn parse_now(opt: &str, now: Option<&str>) -> Result<i64> {
    match now {
        None => Ok(chrono::Utc::now().timestamp()),
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .map(|d| d.timestamp())
            .map_err(|_| {
                Error::Invalid(format!(
                    "{opt} '{t}' is not an RFC 3339 time; write it like 2026-11-22T10:00:00Z"
                ))
            }),
    }
}

/// A progress bar on a terminal (nothing with -q or when stderr is not a terminal).
fn progress(g: &Global, what: &str) -> indicatif::ProgressBar {
    if g.quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Runs `req` on the store of `-s`, with a progress bar named `what` when it is long.
fn call(g: &Global, req: Request, data: ops::Data, what: &str) -> Result<ops::Reply> {
    let pb = progress(g, what);
    let r = client(g)?.call(req, data, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    r
}

fn unexpected(r: Response) -> Error {
    Error::Internal(format!("unexpected answer from the store: {r:?}"))
}

/// Runs one parsed command line.
///
/// Long on purpose: it is the command table, one short arm per command (parse, one call,
/// render); splitting it would scatter that table. Anything longer lives in a function below.
pub fn run(cli: Cli) -> Result<Output> {
    check_environment()?;
    let g = &cli.global;
    let st = Style {
        json: g.json,
        quiet: g.quiet,
    };
    match cli.cmd {
        Cmd::Init {
            target,
            origin,
            chunk_size,
            on_full,
            metadata_size,
            force,
        } => {
            let path = match &target {
                Some(t) => t.as_path(),
                None => store_path(g)?,
            };
            let opts = init_options(&chunk_size, on_full, metadata_size.as_deref(), force)?;
            let sb = ops::init(path, &origin, &opts)?;
            Ok(render::init(st, &sb, &path.display().to_string()))
        }
        Cmd::Serve {
            socket,
            listen,
            tls_cert,
            tls_key,
            tls_client_ca,
            no_tls,
            group,
            cache,
        } => {
            let cache_bytes = parse_size(&cache)
                .ok()
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "--cache '{cache}' is not a size; write it like 64M or 1G"
                    ))
                })?;
            if cache_bytes < crate::store::MIN_CACHE_BYTES {
                return Err(Error::Invalid(format!(
                    "--cache {cache} is too small; give it at least 4M"
                )));
            }
            crate::server::serve(
                store_path(g)?,
                crate::server::ServeOptions {
                    socket,
                    listen,
                    tls_cert,
                    tls_key,
                    tls_client_ca,
                    no_tls,
                    group,
                    cache_bytes,
                    verbose: g.verbose > 0,
                },
            )?;
            Ok(Output {
                text: String::new(),
                code: 0,
            })
        }
        Cmd::Upgrade => {
            let path = store_path(g)?;
            let rep = ops::upgrade(path)?;
            Ok(render::upgraded(st, &path.display().to_string(), &rep))
        }
        Cmd::GenerateDocs { out_dir } => {
            generate_docs(&out_dir)?;
            Ok(Output {
                text: String::new(),
                code: 0,
            })
        }
        Cmd::Prune {
            dry_run,
            now,
            config,
        } => {
            let now = parse_now("--now", now.as_deref())?;
            let stores: Vec<PathBuf> = match &g.store {
                Some(s) => vec![s.clone()],
                None => schedule::load_config(&config)?
                    .into_iter()
                    .map(|s| s.path)
                    .collect(),
            };
            let done = schedule::prune(&stores, &|p| ops::connect(p, false), now, dry_run)?;
            Ok(render::pruned(st, dry_run, &done))
        }
        Cmd::Schedule(ScheduleCmd::Run {
            dry_run,
            now,
            config,
        }) => {
            let at = parse_now("--now", now.as_deref())?;
            let stores = configured(g, &config)?;
            let ran = schedule::run(
                &stores,
                &|p| ops::connect(p, false),
                at,
                now.is_some(),
                dry_run,
                g.quiet,
            )?;
            Ok(render::schedule_ran(st, dry_run, at, &ran))
        }
        Cmd::Schedule(ScheduleCmd::Status { now, config }) => {
            let at = parse_now("--now", now.as_deref())?;
            let stores = configured(g, &config)?;
            let rows = schedule::status(&stores, &|p| ops::connect(p, false), at)?;
            Ok(render::schedule_status(st, at, &rows))
        }
        Cmd::Create {
            name,
            expires,
            labels,
            from,
            writable,
            freeze,
            freeze_timeout,
            pre_hook,
            post_hook,
            hook_timeout,
            created_at,
        } => {
            let spec = create_spec(name, expires, &labels, from, writable, created_at)?;
            let around = Around {
                freeze,
                freeze_timeout: crate::names::parse_duration(&freeze_timeout).ok_or_else(|| {
                    Error::Invalid(format!(
                        "--freeze-timeout '{freeze_timeout}' is not a duration (30s, 2m)"
                    ))
                })?,
                hook_timeout: crate::names::parse_duration(&hook_timeout).ok_or_else(|| {
                    Error::Invalid(format!(
                        "--hook-timeout '{hook_timeout}' is not a duration (30s, 10m)"
                    ))
                })?,
                pre_hook,
                post_hook,
            };
            let mut c = client(g)?;
            let (snap, cs) =
                consistent::create(c.as_mut(), store_path(g)?, spec, &around, g.quiet)?;
            Ok(render::created(st, &snap, cs))
        }
        Cmd::Info => match call(g, Request::Info, None, "")?.response {
            Response::Info(i) => Ok(render::info(st, &i)),
            r => Err(unexpected(r)),
        },
        Cmd::List { tree } => match call(g, Request::List, None, "")?.response {
            Response::List {
                store,
                chunk_size,
                snapshots,
            } => Ok(render::list(st, &store, chunk_size, &snapshots, tree)),
            r => Err(unexpected(r)),
        },
        Cmd::Show { name } => match call(g, Request::Show { name }, None, "")?.response {
            Response::Snapshot {
                snapshot,
                chunk_size,
            } => Ok(render::show(st, &snapshot, chunk_size)),
            r => Err(unexpected(r)),
        },
        Cmd::SetWritable { name } => {
            match call(g, Request::SetWritable { name }, None, "")?.response {
                Response::Snapshot {
                    snapshot: s,
                    chunk_size,
                } => {
                    let text = format!(
                        "snapshot '{}' is writable (one-way: it cannot become read-only again)\n",
                        s.name
                    );
                    Ok(render::snapshot(st, &s, chunk_size, text))
                }
                r => Err(unexpected(r)),
            }
        }
        Cmd::Rename { old, new } => {
            crate::names::validate(&new)?;
            let text = format!("renamed '{old}' to '{new}'\n");
            match call(g, Request::Rename { old, new }, None, "")?.response {
                Response::Snapshot {
                    snapshot,
                    chunk_size,
                } => Ok(render::snapshot(st, &snapshot, chunk_size, text)),
                r => Err(unexpected(r)),
            }
        }
        Cmd::Delete { names, force } => {
            match call(g, Request::Delete { names, force }, None, "")?.response {
                Response::Deleted { names, freed_bytes } => {
                    Ok(render::deleted(st, &names, freed_bytes))
                }
                r => Err(unexpected(r)),
            }
        }
        Cmd::Export { name, output } => export(g, st, name, output.as_deref()),
        Cmd::Write {
            offset,
            input,
            snapshot,
        } => {
            let offset = parse_size(&offset).map_err(|_| {
                Error::Invalid(format!(
                    "--offset '{offset}' is not a byte offset; write it like 4096, 4K or 1M"
                ))
            })?;
            let src = files::input(input.as_deref())?;
            let reply = call(g, Request::Write { offset, snapshot }, Some(src), "")?;
            render::events(st, &reply.events);
            match reply.response {
                Response::Written {
                    offset,
                    bytes,
                    snapshot,
                } => Ok(render::written(st, offset, bytes, snapshot.as_deref())),
                r => Err(unexpected(r)),
            }
        }
        Cmd::Diff { from, to } => match call(g, Request::Diff { from, to }, None, "")?.response {
            Response::Diff {
                from,
                to,
                chunk_size,
                ranges,
            } => Ok(render::diff(st, &from, &to, chunk_size, &ranges)),
            r => Err(unexpected(r)),
        },
        Cmd::Restore {
            name,
            no_backup,
            force,
            to,
            resume,
        } => restore(g, st, name, !no_backup, force, to.as_deref(), resume),
        Cmd::Check {
            data,
            repair,
            drop_damaged,
        } => {
            let what = "verifying saved chunks";
            let req = Request::Check {
                data,
                repair,
                drop_damaged,
            };
            match call(g, req, None, what)?.response {
                Response::Checked { store, report } => Ok(render::check(st, &store, &report)),
                r => Err(unexpected(r)),
            }
        }
    }
}

/// The variables that steer every command (AFTER_HELP's ENVIRONMENT): a typo in one used to be
/// ignored without a word (the default taken instead). Empty is the same as unset.
fn check_environment() -> Result<()> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(v) = var("SNAPCTL_LOCK_TIMEOUT") {
        if !v.parse::<f64>().is_ok_and(|s| s.is_finite() && s >= 0.0) {
            return Err(Error::Invalid(format!(
                "SNAPCTL_LOCK_TIMEOUT='{v}' is not a number of seconds (like 5 or 0.5); fix it or unset it"
            )));
        }
    }
    if let Some(v) = var("SNAPCTL_IO_ENGINE") {
        if !["uring", "sync", "auto"].contains(&v.as_str()) {
            return Err(Error::Invalid(format!(
                "SNAPCTL_IO_ENGINE='{v}' is not uring, sync or auto; fix it or unset it"
            )));
        }
    }
    Ok(())
}

/// `init`'s options, parsed.
fn init_options(
    chunk_size: &str,
    on_full: OnFullArg,
    metadata_size: Option<&str>,
    force: bool,
) -> Result<InitOptions> {
    Ok(InitOptions {
        chunk_size: parse_size(chunk_size).map_err(|_| {
            Error::Invalid(format!(
                "--chunk-size '{chunk_size}' is not a size; use a power of two from 4K to 1M"
            ))
        })?,
        on_full: match on_full {
            OnFullArg::DropOldest => OnFull::DropOldest,
            OnFullArg::Invalidate => OnFull::Invalidate,
            OnFullArg::FailWrites => OnFull::FailWrites,
        },
        force,
        metadata_size: metadata_size
            .map(|m| {
                parse_size(m).map_err(|_| {
                    Error::Invalid(format!(
                        "--metadata-size '{m}' is not a size; write it like 8M, 64MiB or 1G"
                    ))
                })
            })
            .transpose()?,
    })
}

/// A new snapshot as `create`'s arguments describe it.
fn create_spec(
    name: String,
    expires: Option<String>,
    labels: &[String],
    from: Option<String>,
    writable: bool,
    created_at: Option<String>,
) -> Result<CreateSpec> {
    crate::names::validate(&name)?;
    let now = chrono::Utc::now().timestamp();
    Ok(CreateSpec {
        name,
        expires: expires
            .as_deref()
            .map(|e| parse_expiry(e, now))
            .transpose()?,
        labels: parse_labels(labels)?,
        from,
        writable,
        created: created_at
            .as_deref()
            .map(|t| parse_now("--created-at", Some(t)))
            .transpose()?,
    })
}

/// The stores of the configuration, or only `-s` when given (which must be one of them).
fn configured(g: &Global, config: &Path) -> Result<Vec<schedule::policy::StoreConfig>> {
    let stores = schedule::load_config(config)?;
    let Some(only) = g.store.as_deref() else {
        return Ok(stores);
    };
    // `-s store.img` from the store's directory names the configured /srv/store.img too.
    let same = |p: &Path| {
        p == only
            || matches!((std::fs::canonicalize(p), std::fs::canonicalize(only)), (Ok(a), Ok(b)) if a == b)
    };
    let mine: Vec<_> = stores.into_iter().filter(|s| same(&s.path)).collect();
    if mine.is_empty() {
        return Err(Error::NotFound(format!(
            "store {} is not in {}; add it there, or leave out -s (and SNAPCTL_STORE)",
            only.display(),
            config.display()
        )));
    }
    Ok(mine)
}

/// `export NAME [-o FILE]`: a file is written whole or not at all (into a temporary file beside
/// it, renamed over it on success); stdout and devices are written in place.
fn export(g: &Global, st: Style, name: String, output: Option<&Path>) -> Result<Output> {
    // The watch comes first: a signal at any instant after the temporary file exists finds it.
    let device = output.is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| !m.is_file()));
    let tmp = output.filter(|_| !device).and_then(files::temporary_for);
    let left = match output {
        Some(p) if tmp.is_some() => format!("{} was left as it was", p.display()),
        Some(p) => format!("{} holds part of the image", p.display()),
        None => "the image on stdout is incomplete".into(),
    };
    let _watch = interrupt::Watch::start(g.json, left, tmp);
    let (pending, sink) = match output {
        Some(p) => {
            let out = files::AtomicOutput::create(p)?;
            let f = out
                .file
                .try_clone()
                .map_err(|e| Error::io(format!("output {}", p.display()), e))?;
            (Some(out), f)
        }
        None => (None, files::stdout_for_image(g.json)?),
    };
    let reply = match call(
        g,
        Request::Export { name: name.clone() },
        Some(sink),
        &format!("export {name}"),
    ) {
        // `snapctl export origin | cmp -s - x`: a reader that stops early is not an error.
        Err(Error::Io { source, .. })
            if output.is_none() && source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            return Ok(render::exported(st, &name, 0, None));
        }
        // The store does not know what the caller calls its output: name it here.
        Err(Error::Io { message, source }) if message.starts_with("export output") => {
            let what = output.map_or("stdout".into(), |p| p.display().to_string());
            return Err(match source.raw_os_error() {
                Some(libc::ENOSPC) => Error::Io {
                    message: format!(
                        "output {what}: no space left on its file system or device; free some space or export elsewhere"
                    ),
                    source,
                },
                _ => Error::io(format!("output {what}"), source),
            });
        }
        r => r?,
    };
    if let Some(out) = pending {
        out.commit()?;
    }
    match reply.response {
        Response::Exported { name, bytes } => Ok(render::exported(
            st,
            &name,
            bytes,
            output.map(|p| p.display().to_string()).as_deref(),
        )),
        r => Err(unexpected(r)),
    }
}

fn restore(
    g: &Global,
    st: Style,
    name: Option<String>,
    backup: bool,
    force: bool,
    to: Option<&Path>,
    resume: bool,
) -> Result<Output> {
    if resume {
        return match call(g, Request::ResumeRestore, None, "")?.response {
            Response::Resumed { restore } => Ok(render::resumed(st, restore.as_deref())),
            r => Err(unexpected(r)),
        };
    }
    let Some(name) = name else {
        return Err(Error::Invalid("restore needs a snapshot name".into()));
    };
    let what = format!("restore {name}");
    if let Some(dev) = to {
        let target = dev.display().to_string();
        let dst = files::restore_target(dev)?;
        let left = format!("{target} holds part of the image; run the restore again");
        let _watch = interrupt::Watch::start(g.json, left, None);
        let req = Request::RestoreTo { name, target };
        return match call(g, req, Some(dst), &what)?.response {
            Response::RestoredTo {
                name,
                target,
                written_bytes,
            } => Ok(render::restored_to(st, &name, &target, written_bytes)),
            r => Err(unexpected(r)),
        };
    }
    let left = format!(
        "a restore that had begun is finished by the next command on the store (`snapctl -s {} restore --resume`)",
        store_path(g)?.display()
    );
    let _watch = interrupt::Watch::start(g.json, left, None);
    let reply = call(
        g,
        Request::Restore {
            name,
            backup,
            force,
        },
        None,
        &what,
    )?;
    render::events(st, &reply.events);
    match reply.response {
        Response::Restored {
            name,
            backup,
            written_bytes,
        } => Ok(render::restored(
            st,
            &name,
            backup.as_deref(),
            written_bytes,
        )),
        r => Err(unexpected(r)),
    }
}
