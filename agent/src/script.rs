//! Script jobs (`EjecutarScript`): the configured shell runs the text with
//! `-c`, in its own process group, with stdout and stderr captured (up to a
//! bound each), a time limit, and cancellation (the whole group is killed).
//! Exit code 0 → succeeded; anything else → failed, with the output in the
//! result either way.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::jobs::{Failure, Job, Outcome};
use crate::spec::ScriptSpec;
use crate::Ctx;

async fn capture<R: AsyncRead + Unpin>(mut r: R, limit: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(out.len());
                if room < n {
                    truncated = true;
                }
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (out, truncated)
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Run a script job.
pub async fn run(job: &Job, ctx: &Ctx, s: &ScriptSpec) -> Outcome {
    let max = ctx.settings.jobs.script_timeout_s.max(1);
    let limit = Duration::from_secs(s.timeout_s.unwrap_or(max).min(max));
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&ctx.settings.jobs.shell);
    cmd.arg("-c")
        .arg(&s.script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        Failure::new(
            "io",
            format!("starting {}: {e}", ctx.settings.jobs.shell.display()),
        )
    })?;
    let pid = child.id();
    let cap = ctx.settings.jobs.script_output_bytes;
    let out = child.stdout.take().map(|o| tokio::spawn(capture(o, cap)));
    let err = child.stderr.take().map(|e| tokio::spawn(capture(e, cap)));
    let mut timed_out = false;
    let mut cancelled = false;
    let status = tokio::select! {
        s = child.wait() => s.ok(),
        _ = tokio::time::sleep(limit) => { timed_out = true; None }
        _ = job.cancel.cancelled() => { cancelled = true; None }
    };
    let status = match status {
        Some(s) => Some(s),
        None => {
            kill_group(pid);
            child.wait().await.ok()
        }
    };
    // Children left in the group would keep the pipes open.
    kill_group(pid);
    let join = |h: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>| async move {
        match h {
            Some(h) => tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => (Vec::new(), false),
        }
    };
    let (stdout, out_trunc) = join(out).await;
    let (stderr, err_trunc) = join(err).await;
    let code = status.and_then(|s| s.code());
    let signal = status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
    let result = json!({
        "exit_code": code,
        "signal": signal,
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
        "stdout_truncated": out_trunc,
        "stderr_truncated": err_trunc,
        "timed_out": timed_out,
        "duration_s": started.elapsed().as_secs_f64(),
    });
    let fail = |kind: &str, msg: String| {
        let mut f = Failure::new(kind, msg);
        f.result = Some(result.clone());
        f
    };
    if cancelled {
        return Err(fail("cancelled", "cancelled; the script was killed".into()).cancelled());
    }
    if timed_out {
        return Err(fail(
            "timeout",
            format!(
                "the script ran longer than {} s and was killed",
                limit.as_secs()
            ),
        ));
    }
    match code {
        Some(0) => Ok(result),
        Some(c) => Err(fail(
            "exit_status",
            format!("the script exited with status {c}"),
        )),
        None => Err(fail(
            "exit_status",
            format!("the script was killed by signal {}", signal.unwrap_or(0)),
        )),
    }
}
