//! `raftmq ctl backup ...`: create, list, inspect, download, upload,
//! restore, delete, over the admin API ([`super::http`]); progress bars
//! (stderr) on transfers and while waiting for a job.
//!
//! `restore ID|FILE` resolves its argument:
//! 1. a bare backup file name (`raftmq-backup-ID.tar.gz`) that is not a file
//!    in the current folder: backup ID (a file in the node's backup folder);
//! 2. a backup id: that backup;
//! 3. otherwise a path (absolute or relative) to a local file: when the
//!    cluster already holds a backup of that name and size (the node's own
//!    folder, seen from the same machine), that backup; else the file is
//!    uploaded first and the uploaded copy restored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use http_body_util::BodyExt;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;

use super::http::{send, BackupList, SendBody, Started, Uploaded};
use super::{id_of_file, valid_id, BackupDetail, JobInfo};
use crate::admin::client::BaseUrl;
use crate::admin::cluster::ErrorBody;
use crate::ctl::{CtlArgs, CtlError};

/// Requests other than transfers and waits.
const TIMEOUT: Duration = Duration::from_secs(30);
/// A transfer (download / upload) may take this long.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Waiting for a job gives up after this long without progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Takes a backup on the node --url names (waits until written unless --detach).
    Create {
        #[arg(long)]
        detach: bool,
    },
    /// Lists the backups of every node.
    List,
    /// Shows a backup's manifest (or a job's progress).
    Inspect { id: String },
    /// Downloads a backup file.
    Download {
        id: String,
        /// Output file (default: its name in the current folder).
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Uploads a local backup file to the node (validated there).
    Upload { file: PathBuf },
    /// Restores a backup: an id, a path, or a file name in the backup folder.
    Restore {
        backup: String,
        /// merge (live, keeps what exists) or replace (a fresh cluster).
        #[arg(long, default_value = "merge")]
        mode: String,
        /// Return once started instead of waiting for the end.
        #[arg(long)]
        detach: bool,
    },
    /// Deletes a backup.
    Delete { id: String },
}

struct Client {
    base: BaseUrl,
    token: Option<String>,
    url: String,
}

impl Client {
    fn path(&self, p: &str) -> String {
        format!("{}/api/v1{p}", self.base.prefix)
    }

    async fn call_at<T: DeserializeOwned>(
        &self,
        authority: &str,
        method: Method,
        path: &str,
        body: SendBody,
        timeout: Duration,
    ) -> Result<(T, String, String), CtlError> {
        let (resp, at) = send(authority, method, &self.path(path), self.token.as_deref(), body, timeout)
            .await
            .map_err(|e| match e {
                super::http::SendError::Connect { source, .. } => {
                    CtlError::Connect { url: self.url.clone(), source }
                }
                e => CtlError::BadResponse { url: self.url.clone(), message: e.to_string() },
            })?;
        let status = resp.status().as_u16();
        let body = super::http::read_body(resp, 16 * 1024 * 1024)
            .await
            .map_err(|message| CtlError::BadResponse { url: self.url.clone(), message })?;
        if status == 401 {
            return Err(CtlError::Unauthorized { url: self.url.clone() });
        }
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
            return Err(CtlError::Api { status, message });
        }
        let raw = String::from_utf8_lossy(&body).to_string();
        let v = serde_json::from_slice(&body)
            .map_err(|e| CtlError::BadResponse { url: self.url.clone(), message: e.to_string() })?;
        Ok((v, raw, at))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: SendBody,
        timeout: Duration,
    ) -> Result<(T, String, String), CtlError> {
        let a = self.base.authority.clone();
        self.call_at(&a, method, path, body, timeout).await
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

fn job_bar(what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} records") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Polls a job on `authority` until it ends; errors if it failed.
async fn wait_job(c: &Client, authority: &str, id: &str, what: &str) -> Result<JobInfo, CtlError> {
    let pb = job_bar(what);
    let mut last_progress = (tokio::time::Instant::now(), 0u64);
    loop {
        let (d, _, _): (BackupDetail, _, _) =
            c.call_at(authority, Method::GET, &format!("/backups/{id}"), SendBody::Empty, TIMEOUT).await?;
        let Some(job) = d.job else {
            pb.finish_and_clear();
            return Err(CtlError::BadResponse { url: c.url.clone(), message: format!("no job {id}") });
        };
        pb.set_length(job.total.max(job.done));
        pb.set_position(job.done);
        match job.state.as_str() {
            "running" => {}
            "complete" => {
                pb.finish_and_clear();
                return Ok(job);
            }
            _ => {
                pb.finish_and_clear();
                return Err(CtlError::Api {
                    status: 500,
                    message: format!("{} {id} {}: {}", job.kind, job.state, job.error.unwrap_or_default()),
                });
            }
        }
        if job.done != last_progress.1 {
            last_progress = (tokio::time::Instant::now(), job.done);
        } else if last_progress.0.elapsed() > STALL_TIMEOUT {
            pb.finish_and_clear();
            return Err(CtlError::BadResponse {
                url: c.url.clone(),
                message: format!("job {id} made no progress for {STALL_TIMEOUT:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn counts_text(j: &JobInfo) -> String {
    j.counts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// What `restore` was given, resolved.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Id(String),
    File(PathBuf),
}

/// Rule 1 and 2 of the module docs (rule 3 needs the cluster's list).
pub fn classify(arg: &str, cwd: &Path) -> Target {
    let is_plain = !arg.contains('/');
    if is_plain {
        if let Some(id) = id_of_file(arg) {
            if !cwd.join(arg).is_file() {
                return Target::Id(id.to_string());
            }
        } else if valid_id(arg) && !arg.ends_with(".gz") && !cwd.join(arg).is_file() {
            return Target::Id(arg.to_string());
        }
    }
    Target::File(PathBuf::from(arg))
}

async fn upload(c: &Client, file: &Path) -> Result<(Uploaded, String), CtlError> {
    let len = std::fs::metadata(file)
        .map_err(|e| CtlError::BadResponse {
            url: c.url.clone(),
            message: format!("{}: {e}", file.display()),
        })?
        .len();
    let pb = bar(len, "upload");
    let pb2 = pb.clone();
    let body = SendBody::File(file.to_path_buf(), Box::new(move |n| pb2.set_position(n)));
    let r = c.call(Method::POST, "/backups/upload", body, TRANSFER_TIMEOUT).await;
    pb.finish_and_clear();
    let (u, raw, _) = r?;
    Ok((u, raw))
}

/// Runs one `ctl backup` command; returns what to print.
pub async fn execute(args: &CtlArgs, cmd: &BackupCommand) -> Result<String, CtlError> {
    let base = BaseUrl::parse(&args.url).map_err(CtlError::Url)?;
    let c = Client { url: base.as_url(), base, token: args.token.clone() };
    match cmd {
        BackupCommand::Create { detach } => {
            let (s, raw, at): (Started, _, _) =
                c.call(Method::POST, "/backups", SendBody::Empty, TIMEOUT).await?;
            if *detach {
                return Ok(if args.json {
                    format!("{raw}\n")
                } else {
                    format!("backup {} started on node {}\n", s.id, s.node_id)
                });
            }
            let j = wait_job(&c, &at, &s.id, "backup").await?;
            Ok(format!("backup {} written on node {}: {}\n", s.id, s.node_id, counts_text(&j)))
        }
        BackupCommand::List => {
            let (l, raw, _): (BackupList, _, _) =
                c.call(Method::GET, "/backups", SendBody::Empty, TIMEOUT).await?;
            if args.json {
                return Ok(format!("{raw}\n"));
            }
            let mut out =
                format!("{:<22} {:>4}  {:<24} {:>12}  {}\n", "ID", "NODE", "CREATED", "SIZE", "STATE");
            for b in &l.backups {
                out.push_str(&format!(
                    "{:<22} {:>4}  {:<24} {:>12}  {}\n",
                    b.id, b.node_id, b.created_at, b.size, b.state
                ));
            }
            if !l.unreachable.is_empty() {
                out.push_str(&format!("unreachable nodes (not listed): {:?}\n", l.unreachable));
            }
            Ok(out)
        }
        BackupCommand::Inspect { id } => {
            let (_d, raw, _): (BackupDetail, _, _) =
                c.call(Method::GET, &format!("/backups/{id}"), SendBody::Empty, TIMEOUT).await?;
            let v: serde_json::Value = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
            Ok(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or(raw)))
        }
        BackupCommand::Download { id, output } => {
            let out = output.clone().unwrap_or_else(|| PathBuf::from(super::file_name(id)));
            download(&c, id, &out).await?;
            Ok(format!("downloaded {id} to {}\n", out.display()))
        }
        BackupCommand::Upload { file } => {
            let (u, raw) = upload(&c, file).await?;
            Ok(if args.json {
                format!("{raw}\n")
            } else {
                format!("uploaded as backup {} on node {}\n", u.id, u.node_id)
            })
        }
        BackupCommand::Restore { backup, mode, detach } => {
            if mode != "merge" && mode != "replace" {
                return Err(CtlError::Api {
                    status: 400,
                    message: format!("--mode {mode:?}: merge or replace"),
                });
            }
            let cwd = std::env::current_dir().unwrap_or_default();
            let id = match classify(backup, &cwd) {
                Target::Id(id) => id,
                Target::File(p) => {
                    let len = std::fs::metadata(&p)
                        .map_err(|e| CtlError::Api { status: 400, message: format!("{}: {e}", p.display()) })?
                        .len();
                    let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                    let (l, _, _): (BackupList, _, _) =
                        c.call(Method::GET, "/backups", SendBody::Empty, TIMEOUT).await?;
                    let held = id_of_file(&name)
                        .and_then(|id| l.backups.iter().find(|b| b.id == id && b.size == len))
                        .map(|b| b.id.clone());
                    match held {
                        Some(id) => id,
                        None => upload(&c, &p).await?.0.id,
                    }
                }
            };
            let body = SendBody::Json(format!("{{\"mode\":\"{mode}\"}}"));
            let (s, raw, at): (Started, _, _) =
                c.call(Method::POST, &format!("/backups/{id}/restore"), body, TIMEOUT).await?;
            if *detach {
                return Ok(if args.json {
                    format!("{raw}\n")
                } else {
                    format!("restore {} of {id} started on node {}\n", s.id, s.node_id)
                });
            }
            let j = wait_job(&c, &at, &s.id, "restore").await?;
            Ok(format!("restored {id} ({mode}): {}\n", counts_text(&j)))
        }
        BackupCommand::Delete { id } => {
            let (_s, _, _): (Started, _, _) =
                c.call(Method::DELETE, &format!("/backups/{id}"), SendBody::Empty, TIMEOUT).await?;
            Ok(format!("deleted {id}\n"))
        }
    }
}

async fn download(c: &Client, id: &str, out: &Path) -> Result<(), CtlError> {
    let bad = |message: String| CtlError::BadResponse { url: c.url.clone(), message };
    let (resp, _) = send(
        &c.base.authority,
        Method::GET,
        &c.path(&format!("/backups/{id}/file")),
        c.token.as_deref(),
        SendBody::Empty,
        TRANSFER_TIMEOUT,
    )
    .await
    .map_err(|e| bad(e.to_string()))?;
    let status = resp.status().as_u16();
    if status == 401 {
        return Err(CtlError::Unauthorized { url: c.url.clone() });
    }
    if status != 200 {
        let body = super::http::read_body(resp, 1024 * 1024).await.unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).to_string());
        return Err(CtlError::Api { status, message });
    }
    let len = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pb = bar(len, "download");
    let partial = out.with_extension("partial");
    let mut f =
        tokio::fs::File::create(&partial).await.map_err(|e| bad(format!("{}: {e}", partial.display())))?;
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| bad(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            f.write_all(data).await.map_err(|e| bad(e.to_string()))?;
            got += data.len() as u64;
            pb.set_position(got);
        }
    }
    pb.finish_and_clear();
    f.sync_all().await.map_err(|e| bad(e.to_string()))?;
    if len != 0 && got != len {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(bad(format!("download cut short: {got} of {len} bytes")));
    }
    tokio::fs::rename(&partial, out).await.map_err(|e| bad(format!("{}: {e}", out.display())))?;
    Ok(())
}
